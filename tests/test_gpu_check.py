"""scripts/gpu_check.sh stays runnable before a GPU is at hand: its shell parses, and its GEMM part runs on CPU."""

import json
import subprocess
from pathlib import Path

from vreason_batch.bench import gpu

ROOT = Path(__file__).resolve().parents[1]


def test_the_script_parses_and_names_only_parts_that_exist():
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)
    for part in ("gemm", "agreement", "step"):
        assert f"vreason_batch.bench.gpu {part}" in script
    assert "bench --workload step" in script


def test_the_gemm_part_measures_both_paths_against_float64(capsys):
    assert gpu.main(["gemm", "--small", "--device", "cpu", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["part"] == "gemm" and len(figures["gemm"]) == 2
    for row in figures["gemm"]:
        # fp32 activations times bf16 weights with fp32 accumulation: close to float64
        assert 0 < row["matmul32_max_rel_err"] < 1e-5 and 0 < row["chunked_max_rel_err"] < 1e-5
