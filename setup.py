"""Packaging: `pip install .` gives the `botworker` command (same program as `python worker.py`)."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.split("#", 1)[0].strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.split("#", 1)[0].strip()
]

setup(
    name="botworker",
    version="0.1.0",
    description="Worker that answers bot messages from Redis with tools, an LLM and PostgreSQL history",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["botworker", "botworker.*", "sandbox", "sandbox.*"]),
    install_requires=requirements,
    entry_points={
        "console_scripts": ["botworker = botworker.__main__:main"],
        # Tool families: a third-party package adds a tool type by declaring one more entry point in this group.
        "botworker.tools": [
            "platform = botworker.tools.platform",
            "http = botworker.tools.http",
            "database = botworker.tools.database",
            "sandboxed = botworker.tools.sandboxed",
            "workflow = botworker.tools.workflow",
        ],
    },
)
