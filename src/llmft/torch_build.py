"""The PyTorch build `make setup` installs: the pinned torch, built for a CUDA this machine's NVIDIA driver runs.

    python3 src/llmft/torch_build.py            # prints cu130, cu128, cu126 or cpu; the reason on stderr
    python3 src/llmft/torch_build.py cu126      # a forced choice: make setup TORCH_CUDA=cu126
    python3 src/llmft/torch_build.py auto --install --python .venv/bin/python   # what make setup runs

PyPI's torch==2.11.0 is the CUDA 13.0 build (requirements-lock.txt pins its CUDA 13 wheels); CUDA 13 needs an NVIDIA
driver >= 580, so on an older driver torch sees no GPU and everything silently runs on the CPU. Where `nvidia-smi`
reports an older driver, this picks the same torch/torchvision/torchaudio versions built for CUDA 12.8 or 12.6 from
PyTorch's wheel index, and installs them first, then the rest of the lock without its CUDA 13 lines.

Run by the system Python before .venv exists: standard library only, nothing imported from llmft.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INDEX = "https://download.pytorch.org/whl"
PYPI_BUILD = "cu130"  # torch 2.11.0 on PyPI is built for CUDA 13.0: `make setup` installs it from the lock as is
CHOICES = ("cu130", "cu128", "cu126", "cpu")
# CUDA 12.x builds run on any driver from the 12.0 GA one on, through CUDA minor version compatibility (NVIDIA,
# CUDA Toolkit release notes, Table 2: 12.x >= 525; 13.x >= 580), except for PTX JIT: torch's cu126 build ships
# compiled kernels (SASS) for every GPU it supports, so it needs none. 525.60.13 is the CUDA 12.0 GA driver (Table 3).
CUDA12_MINOR_COMPAT = (525, 60, 13)


@dataclass(frozen=True)
class Build:
    tag: str
    cuda: str
    min_driver: tuple[int, ...]  # Linux x86_64 toolkit driver of that CUDA's GA release
    min_cc: tuple[int, int]  # GPU compute capabilities the build has kernels for: [min_cc, max_cc)
    max_cc: tuple[int, int]


# Newest first. Toolkit drivers from NVIDIA's CUDA Toolkit release notes, Table 3 "CUDA Toolkit and Corresponding
# Driver Versions" (https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/): CUDA 13.0 GA >= 580.65.06,
# 12.8 GA >= 570.26, 12.6 GA >= 560.28.03. Architectures: PyTorch's CUDA support matrix for release 2.11
# (RELEASE.md; pytorch/pytorch#172663, #175253): 12.6.3 Maxwell 5.0 to Hopper 9.0; 12.8.1 Turing 7.5 to
# Blackwell 12.0 (Volta dropped); 13.0.2 Turing 7.5 to Blackwell 12.0 + PTX for newer GPUs.
BUILDS = (
    Build("cu130", "13.0", (580, 65, 6), (7, 5), (99, 0)),
    Build("cu128", "12.8", (570, 26), (7, 5), (13, 0)),
    Build("cu126", "12.6", (560, 28, 3), (5, 0), (10, 0)),
)
BY_TAG = {b.tag: b for b in BUILDS}


class Unsupported(Exception):
    """No torch build of the pinned version can use this machine's GPU; the message says what to do."""


@dataclass
class Smi:
    """What `nvidia-smi` says: driver version and each GPU's compute capability, or why it said nothing useful."""

    driver: tuple[int, ...] | None = None
    driver_text: str = ""
    gpus: list[tuple[str, tuple[int, int] | None]] | None = None  # (name, compute capability or None)
    problem: str = ""  # set when nvidia-smi is missing, failed or printed something unreadable


def vtuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def vtext(v: tuple[int, ...]) -> str:
    return ".".join(f"{x:02d}" if i == 2 else str(x) for i, x in enumerate(v))  # 580.65.06, as NVIDIA writes it


def query_smi(timeout: float = 20.0) -> Smi:
    """Run `nvidia-smi --query-gpu=...`; never raises: a missing, hanging or failing nvidia-smi is a `problem`."""
    fields = ["driver_version", "name", "compute_cap"]
    for attempt in (fields, fields[:2]):  # drivers older than ~510 don't know compute_cap
        try:
            proc = subprocess.run(
                ["nvidia-smi", f"--query-gpu={','.join(attempt)}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except FileNotFoundError:
            return Smi(problem="no nvidia-smi on PATH: no NVIDIA driver here")
        except (subprocess.TimeoutExpired, OSError) as e:
            return Smi(problem=f"nvidia-smi did not answer ({type(e).__name__})")
        if proc.returncode == 0 or "compute_cap" not in (proc.stdout + proc.stderr):
            break
    first = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[0][:160]
    if proc.returncode:
        return Smi(problem=f"nvidia-smi failed (exit {proc.returncode}: {first})")
    gpus, drivers = [], set()
    for line in proc.stdout.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 2 or not re.fullmatch(r"\d+\.\d+(\.\d+)?", cells[0]):
            return Smi(problem=f"nvidia-smi printed something unreadable: {line.strip()[:160]!r}")
        drivers.add(cells[0])
        cc = cells[2] if len(cells) > 2 else ""
        gpus.append((cells[1], vtuple(cc) if re.fullmatch(r"\d+\.\d+", cc) else None))
    if not gpus:
        return Smi(problem=f"nvidia-smi lists no GPU ({first})")
    driver = min(drivers, key=vtuple)
    return Smi(driver=vtuple(driver), driver_text=driver, gpus=gpus)


def fits(build: Build, caps: list[tuple[int, int]]) -> bool:
    return all(build.min_cc <= cc < build.max_cc for cc in caps)


def choose(requested: str, smi: Smi, recorded: str = "") -> tuple[str, str]:
    """(build tag, one line saying why) for `requested` = auto or one of CHOICES; `recorded`: where it came from.

    Raises:
        Unsupported: auto, and no build of the pinned torch runs on this driver or GPU.
        ValueError: `requested` is not auto or one of CHOICES.
    """
    requested = (requested or "auto").strip().lower()
    if requested != "auto" and requested not in CHOICES:
        raise ValueError(f"TORCH_CUDA={requested} is not a torch build: use one of {', '.join(CHOICES)} or auto")
    gpus = ", ".join(sorted({name for name, _ in smi.gpus or []}))
    if requested != "auto":
        note = f"TORCH_CUDA={requested}, as {recorded and 'recorded in ' + recorded or 'asked'}"
        build = BY_TAG.get(requested)
        floor = build and (build.min_driver if build.tag == PYPI_BUILD else CUDA12_MINOR_COMPAT)
        if floor and smi.driver and smi.driver < floor:
            note += (
                f"; warning: driver {smi.driver_text} is older than CUDA {build.cuda} needs ({vtext(floor)}), so "
                "torch will not see the GPU"
            )
        return requested, note
    if smi.problem:
        return PYPI_BUILD, (
            f"{smi.problem}: installing PyPI's torch, built for CUDA 13.0 (driver >= 580), as locked; "
            "set TORCH_CUDA=cu128, cu126 or cpu to choose (cpu skips ~3 GB of CUDA libraries)"
        )
    caps = [cc for _, cc in smi.gpus if cc]
    for build in BUILDS:
        if smi.driver >= build.min_driver and fits(build, caps):
            if build.tag == PYPI_BUILD:
                why = "as locked (PyPI's build)"
            elif fits(BY_TAG[PYPI_BUILD], caps):
                why = f"PyPI's CUDA 13.0 build needs driver >= {vtext(BY_TAG[PYPI_BUILD].min_driver)}"
            else:
                why = f"compute capability {vtext(min(caps))} has no kernels in the CUDA 13.0 build"
            return build.tag, f"driver {smi.driver_text} ({gpus}): torch built for CUDA {build.cuda}, {why}"
    cu126 = BY_TAG["cu126"]
    if smi.driver >= CUDA12_MINOR_COMPAT and fits(cu126, caps):
        return "cu126", (
            f"driver {smi.driver_text} ({gpus}): torch built for CUDA 12.6, which this driver runs "
            f"through CUDA minor version compatibility (>= {vtext(CUDA12_MINOR_COMPAT)}); "
            f"PyPI's CUDA 13.0 build needs driver >= {vtext(BY_TAG[PYPI_BUILD].min_driver)}"
        )
    if smi.driver < CUDA12_MINOR_COMPAT:
        raise Unsupported(
            f"NVIDIA driver {smi.driver_text} ({gpus}) is older than any CUDA build of the pinned torch "
            f"can use (CUDA 12.6 needs >= {vtext(CUDA12_MINOR_COMPAT)}, 13.0 >= 580.65.06): update the "
            "driver, or `make setup TORCH_CUDA=cpu` to train on the CPU"
        )
    ccs = ", ".join(sorted({vtext(cc) for cc in caps}))
    raise Unsupported(
        f"no build of the pinned torch has kernels for compute capability {ccs} ({gpus}) on driver "
        f"{smi.driver_text} (cu126: 5.0 to 9.x; cu128 and cu130: 7.5 and newer, from drivers 570.26 and "
        "580.65.06): `make setup TORCH_CUDA=cpu` to train on the CPU"
    )


def pins(requirements: Path) -> dict[str, str]:
    """torch, torchvision, torchaudio versions pinned in requirements.txt."""
    found = dict(re.findall(r"^(torch|torchvision|torchaudio)==([^\s;#]+)", requirements.read_text(), flags=re.M))
    missing = {"torch", "torchvision", "torchaudio"} - set(found)
    if missing:
        raise ValueError(f"{requirements}: no exact pin for {', '.join(sorted(missing))}")
    return found


def cuda_specific(name: str) -> bool:
    """A lock line that belongs to one CUDA build of torch: torch itself, triton, the CUDA runtime wheels."""
    name = re.sub(r"[-_.]+", "-", name.lower())
    return (
        name in ("torch", "torchvision", "torchaudio", "triton")
        or name.startswith("cuda-")
        or (name.startswith("nvidia-") and name != "nvidia-ml-py")
    )  # nvidia-ml-py (NVML) works with any driver


def constraints(lock: Path, build: str) -> str:
    """The lock without the lines of PyPI's CUDA 13 build, for a torch from PyTorch's index (or the CPU build)."""
    keep = []
    for line in lock.read_text().splitlines():
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        # the CPU build pins no triton, but liger-kernel needs one: keep the locked version there
        if name and cuda_specific(name[1]) and not (build == "cpu" and name[1].lower() == "triton"):
            continue
        keep.append(line)
    return "\n".join(keep) + "\n"


def installed_build(python: str) -> str | None:
    """The build of the torch installed in `python`'s environment (its local version label), None if none."""
    try:
        proc = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('torch'))"], capture_output=True, text=True
        )
    except OSError:  # no venv yet
        return None
    if proc.returncode:
        return None
    label = proc.stdout.strip().partition("+")[2]
    return label or PYPI_BUILD  # PyPI's own wheels of older releases had no label


def rel(path: Path) -> str:
    """`path` as the command line shows it: relative to where make runs, when it is below."""
    return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)


def run(cmd: list[str], dry_run: bool) -> None:
    print(" ".join(cmd), flush=True)
    if not dry_run:
        subprocess.run(cmd, check=True)


def index_has(python: str, build: str, version: str) -> bool:
    """Whether PyTorch's index for `build` answers and lists torch `version`+`build` (read-only, a few KB)."""
    cmd = [python, "-m", "pip", "index", "versions", "torch", "--index-url", f"{INDEX}/{build}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode == 0 and re.search(rf"\b{re.escape(version)}\+{build}\b", proc.stdout) is not None


def install(build: str, python: str, root: Path, dry_run: bool = False) -> None:
    """Install requirements.txt into `python`'s venv with torch built for `build`; record the build in the venv.

    Raises:
        Unsupported: PyTorch's index for `build` is unreachable or lacks the pinned torch; nothing was changed.
    """
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    versions = pins(root / "requirements.txt")
    if build != PYPI_BUILD and not index_has(python, build, versions["torch"]):
        raise Unsupported(
            f"{INDEX}/{build} does not answer here, or has no torch {versions['torch']}+{build}: "
            "nothing was changed; check the network (a proxy: pip's --proxy or HTTPS_PROXY)"
        )
    before = installed_build(python)
    if before and before != build:
        # Builds bring different CUDA wheels (nvidia-*-cu12 vs CUDA 13's): remove the old set, so none is left over.
        freeze = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
        old = [
            ln.split("==")[0] for ln in freeze.stdout.splitlines() if "==" in ln and cuda_specific(ln.split("==")[0])
        ]
        print(
            f"switching torch from {before} to {build}: uninstalling {len(old)} packages of the old build", flush=True
        )
        run([python, "-m", "pip", "uninstall", "-q", "-y", *old], dry_run)
    if build == PYPI_BUILD:
        run([*pip, "-r", rel(root / "requirements.txt"), "-c", rel(root / "requirements-lock.txt")], dry_run)
    else:
        cons = Path(python).parent.parent / "constraints-torch.txt"
        if not dry_run:
            cons.write_text(constraints(root / "requirements-lock.txt", build))
        # torch first, from PyTorch's index for this CUDA (it also serves torch's nvidia-*-cu12 wheels), held to the
        # rest of the lock by -c; the configured index (PyPI) stays the main one.
        torch = [f"{name}=={version}+{build}" for name, version in versions.items()]
        run([*pip, "--extra-index-url", f"{INDEX}/{build}", "-c", rel(cons), *torch], dry_run)
        run([*pip, "-r", rel(root / "requirements.txt"), "-c", rel(cons)], dry_run)
    if not dry_run:
        (Path(python).parent.parent / ".torch-cuda").write_text(build + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "build",
        nargs="?",
        default=os.environ.get("TORCH_CUDA") or "auto",
        help=f"auto (from nvidia-smi) or one of {', '.join(CHOICES)}",
    )
    parser.add_argument("--install", action="store_true", help="install requirements.txt with that build")
    parser.add_argument("--python", default=".venv/bin/python", help="the venv's python, for --install")
    parser.add_argument("--dry-run", action="store_true", help="with --install: print the pip commands only")
    parser.add_argument("--quiet", action="store_true", help="print the build only, not why")
    args = parser.parse_args(argv)
    # A forced choice needs nvidia-smi only to warn when the driver is too old for it.
    smi = query_smi() if args.build.lower() == "auto" or not args.quiet else Smi()
    record = Path(args.python).parent.parent / ".torch-cuda"
    recorded = record.exists() and record.read_text().strip() == args.build.lower()
    try:
        build, why = choose(args.build, smi, f"{record} (TORCH_CUDA=auto picks again)" if recorded else "")
    except (Unsupported, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"torch build {build}: {why}", file=sys.stderr)
    if args.install:
        try:
            install(build, args.python, ROOT, dry_run=args.dry_run)
        except (Unsupported, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except subprocess.CalledProcessError as e:
            print(
                f"error: {e}" + (f"; is {INDEX}/{build} reachable from here?" if build != PYPI_BUILD else ""),
                file=sys.stderr,
            )
            return 1
    else:
        print(build)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
