"""The sandbox package (placeholder until the sandbox issue): confined execution of shell commands, custom scripts
and file operations in a separate, resource-limited process. It will import nothing from ``botworker``.

Until it lands, the worker runs no ``shell_command``, ``custom_script`` or ``file_operation`` tool: such calls are
answered with a clear "not supported by this worker" tool result.
"""
