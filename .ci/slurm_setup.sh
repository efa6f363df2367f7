#!/usr/bin/env bash
# Install what tests/slurm needs: Debian's Slurm (slurm-wlm: slurmctld, slurmd, client commands),
# munge and shellcheck. Idempotent. Without root or apt-get it installs nothing and says so; the
# Slurm tests then skip with the reason (the cluster fixture needs root anyway).
set -euo pipefail

packages=(slurm-wlm munge shellcheck)
needed=()
for bin in slurmctld slurmd sbatch munged mungekey shellcheck; do
  command -v "$bin" >/dev/null 2>&1 || needed=("${packages[@]}")
done
if ((${#needed[@]} == 0)); then
  echo "slurm_setup: slurm-wlm, munge and shellcheck already installed"
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "slurm_setup: cannot install ${needed[*]} (needs root and apt-get); Slurm tests will skip"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq "${needed[@]}" >/dev/null; }; then
  echo "slurm_setup: apt-get could not install ${needed[*]}; Slurm tests will skip" >&2
  exit 0
fi
# The packages may start system daemons where an init system runs; the tests start their own
# private munged/slurmctld/slurmd on free ports and never use these.
echo "slurm_setup: installed ${needed[*]} ($(sbatch --version))"
