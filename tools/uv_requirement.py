"""Prints the pip requirement of the uv that uv.lock pins, with the lock's hashes of its wheels.

    python3 tools/uv_requirement.py [uv.lock] > uv.txt && pip install --require-hashes -r uv.txt

The bootstrap of tools/setup_venv.sh and of the Dockerfile: uv is installed by pip once, from the same lock
(and so at the same version and hashes) as everything uv then installs.
"""

import sys
import tomllib


def main(lock_path: str = "uv.lock") -> int:
    with open(lock_path, "rb") as f:
        packages = tomllib.load(f)["package"]
    uv = next((p for p in packages if p["name"] == "uv"), None)
    if uv is None:
        print(f"{lock_path} pins no uv (pyproject.toml's dev group should name it)", file=sys.stderr)
        return 2
    hashes = " ".join(f"--hash={wheel['hash']}" for wheel in uv.get("wheels", []))
    print(f"uv=={uv['version']} {hashes}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
