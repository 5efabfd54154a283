"""The benchmark record: one JSON line per measurement, with the environment it was taken in."""

import datetime
import json
import platform
import subprocess
from pathlib import Path

import torch


def _commit() -> str:
    """The commit of the fused_cbam checkout that is running (not of the current directory's
    repository); "unknown" for an installed copy outside git."""
    checkout = Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=checkout)

    try:
        out = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return f"{model} ({torch.get_num_threads()} threads)"


def environment(device: torch.device, quick: bool) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": _commit(),
        "quick": quick,
    }


def record_path(out_dir: Path, env: dict) -> Path:
    slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"].split(" (")[0]).strip("-").lower()
    return out_dir / f"bench-{env['device_type']}-{slug}.jsonl"


def append(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
