"""peft_checkpoint_bytes_ratio: bytes of a LoRA run's checkpoint / bytes of a full fine-tune's checkpoint of the
same model (a Llama built from a config, trained a few steps on the same text, as separate `dtrain train` runs).

A LoRA checkpoint holds only the adapter, its AdamW state and the small files (schedule, RNG, trainer state); a
full fine-tune's holds every weight and its AdamW state. The ratio falls with the model's size (the adapter
grows with width x rank, the model with width squared): docs/huggingface.md extrapolates it to 7B.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _util

QUICK = {"hidden": 128, "layers": 2, "intermediate": 344, "steps": 2}
FULL = {"hidden": 512, "layers": 4, "intermediate": 1376, "steps": 3}
LORA = ["--peft", "lora", "--lora-r", "16", "--lora-alpha", "32"]  # q_proj and v_proj: peft's default for Llama


def write_inputs(work: Path, spec: dict) -> tuple[Path, Path]:
    from transformers import LlamaConfig

    config = work / "config.json"
    LlamaConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128, vocab_size=256,
                bos_token_id=None, eos_token_id=None).to_json_file(str(config))
    text = work / "text.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n"
                            for i in range(2000)))
    return config, text


def checkpoint_bytes(run: Path) -> tuple[int, dict[str, int]]:
    checkpoint = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    files = {p.name: p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()}
    return sum(files.values()), files


def train(work: Path, name: str, config: Path, text: Path, spec: dict, extra: list[str]) -> tuple[int, dict, float]:
    run = work / name
    cmd = [sys.executable, str(_util.REPO / "dtrain" / "train.py"), "--task", "causal-lm", "--model-config",
           str(config), "--data", str(text), "--block-size", "64", "--batch-size", "4", "--epochs", "0",
           "--max-steps", str(spec["steps"]), "--eval-every-steps", "0", "--eval-fraction", "0", "--sample-chars",
           "0", "--warmup-steps", "1", "--output-dir", str(run), *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"bench_peft: the {name} run failed:\n{proc.stdout[-3000:]}")
    total, files = checkpoint_bytes(run)
    return total, files, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = _util.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    spec = _util.chosen_spec(args, QUICK, FULL)
    with tempfile.TemporaryDirectory(prefix="bench-peft-") as temp:
        work = Path(temp)
        config, text = write_inputs(work, spec)
        full_bytes, full_files, full_s = train(work, "full", config, text, spec, [])
        lora_bytes, lora_files, lora_s = train(work, "lora", config, text, spec, LORA)
    ratio = _util.ratio(lora_bytes, full_bytes)
    rows = [["full fine-tune", full_bytes, full_files.get("model.safetensors"), full_files.get("optimizer.bin"),
             f"{full_s:.1f}"],
            ["LoRA r=16 (q_proj, v_proj)", lora_bytes, lora_files.get("model.safetensors"),
             lora_files.get("optimizer.bin"), f"{lora_s:.1f}"]]
    print(_util.table(f"checkpoint bytes, Llama {spec['layers']} layers x {spec['hidden']} wide",
                      ["run", "checkpoint bytes", "model.safetensors", "optimizer.bin", "run s"], rows,
                      [f"peft_checkpoint_bytes_ratio = {_util.fmt(ratio)}", f"machine {_util.machine()}"]))
    _util.emit({"peft_checkpoint_bytes_ratio": ratio, "peft_checkpoint_bytes": lora_bytes,
                "full_checkpoint_bytes": full_bytes, "device": "cpu"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
