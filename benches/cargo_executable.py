"""Prints the executable a cargo build made for one target, from the build's JSON messages.

    cargo bench --bench unet_step --no-run --message-format=json | python3 benches/cargo_executable.py unet_step
"""

import json
import sys

for line in sys.stdin:
    message = json.loads(line)
    if (
        message.get("reason") == "compiler-artifact"
        and message.get("executable")
        and message["target"]["name"] == sys.argv[1]
    ):
        print(message["executable"])
