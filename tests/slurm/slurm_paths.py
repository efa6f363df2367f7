"""Paths the Slurm tests share (a module of its own: two conftest.py files cannot both be
imported as `conftest`)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
# The sbatch scripts users submit (common.sh is sourced by them, not submitted).
SCRIPTS = sorted(p.name for p in SLURM_DIR.glob("*.sh") if p.name != "common.sh")
