"""botworker: pops bot messages from Redis, runs their tools, replies, saves the exchange in PostgreSQL.

See README.md for the picture of one message's flow and ../shared/CONTRACT.md for the Redis/PostgreSQL contract.
"""

__version__ = "0.1.0"
