"""The table of `bench/gpu_suite.sh`: each figure of its JSON files against the target of the issue. Markdown + JSON.

Reads ``OUT/<bench>.json`` (and ``OUT/runs.tsv``, the seconds and exit status of each bench) and writes
``OUT/summary.md`` (figure, value, target, met or missed by how much, device) and ``OUT/summary.json`` (the same
rows). A bench that failed or was not run gives a "not measured" row, never a silent gap.

    python bench/suite_summary.py runs/gpu_suite            # after bash bench/gpu_suite.sh runs/gpu_suite
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

GIB = 1 << 30
BENCHES = ["finetune_memory", "mae_step", "mae_max_batch", "inference_real", "inference_real_bf16"]
# Targets of the issue "real-scale data path and a ready GPU benchmark suite" (ViT-B on one H100/H200).
FINETUNE_LIMIT_GIB = {3: 20.0, 6: 22.0}
FITCHECK_TOLERANCE = 0.15
MAE_TOKEN_RATIO = 1.5
MAE_MFU = 0.40
CASE_SECONDS = 10.0


def _read(out: Path, name: str) -> dict:
    path = out / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"benchmark": name, "error": f"no readable {path.name}: {err}"}


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _row(figure: str, value: float | None, unit: str, op: str | None = None, target: float | None = None,
         device: str = "", note: str = "") -> dict:
    """One table row; ``op`` "<=" or ">=" compares ``value`` with ``target`` (no target: reported only)."""
    row = {"figure": figure, "value": value, "unit": unit, "op": op, "target": target, "device": device,
           "note": note}
    if value is None:
        row["verdict"], row["margin"] = "not measured", None
    elif op is None:
        row["verdict"], row["margin"] = "reported", None
    else:
        margin = target - value if op == "<=" else value - target  # > 0: met with room to spare
        row["margin"] = margin
        row["verdict"] = "met" if margin >= 0 else "missed"
    return row


def _finetune_rows(r: dict) -> list[dict]:
    device, rows = r.get("device", ""), []
    cfg = r.get("config") or {"arch": "mtl_vit_base", "size": 128, "batch": 2}
    runs = r.get("runs") or [{"phases": t, "grad_checkpointing": c} for t in (3, 6) for c in (True, False)]
    for run in runs:
        t, ckpt = run.get("phases"), "on" if run.get("grad_checkpointing") else "off"
        err = r.get("error") or (run["measured"] if isinstance(run.get("measured"), str) else "")
        rows.append(_row(f"fine-tune peak memory, {cfg['arch']}, {t} x {cfg['size']}^3, batch {cfg['batch']}, "
                         f"checkpointing {ckpt}",
                         _number(run.get("measured_gib")), "GiB", "<=", FINETUNE_LIMIT_GIB.get(t, 22.0),
                         device, err))
        relative = _number(run.get("relative_error"))
        note = "" if relative is None else f"estimate {run['estimate_gib']} GiB vs measured {run['measured_gib']}"
        rows.append(_row(f"fit-check error, {t} phases, checkpointing {ckpt}: abs(estimate / measured - 1)",
                         None if relative is None else abs(relative), "fraction", "<=", FITCHECK_TOLERANCE,
                         device, note or err))
    return rows


def _mae_rows(r: dict) -> list[dict]:
    device, err = r.get("device", ""), r.get("error", "")
    ours, monai = r.get("ours") or {}, r.get("monai") or {}
    ratio = (r.get("ours_vs_monai") or {}).get("tokens_per_s_ratio")
    monai_err = monai.get("error", "")
    cfg = r.get("config") or {"model": "base", "batch": 4, "phases": 4, "size": 128, "mask_ratio": 0.75}
    what = f"{cfg['model']}, {cfg['batch']} x {cfg['phases']} x {cfg['size']}^3, mask {cfg['mask_ratio']}"
    return [
        _row(f"MAE step tokens/s, ours / MONAI MaskedAutoEncoderViT ({what})",
             _number(ratio), "x", ">=", MAE_TOKEN_RATIO, device,
             err or monai_err or f"ours {ours.get('tokens_per_s')} tokens/s, MONAI {monai.get('tokens_per_s')}; "
                                 f"volumes/s ratio {(r.get('ours_vs_monai') or {}).get('volumes_per_s_ratio')}"),
        _row("MAE step model FLOP utilisation, ours", _number(ours.get("mfu")), "fraction", ">=", MAE_MFU, device,
             err or ours.get("error", "") or f"{ours.get('achieved_tflops')} TFLOP/s of {r.get('peak_source')}"),
        _row("MAE step model FLOP utilisation, MONAI", _number(monai.get("mfu")), "fraction", device=device,
             note=err or monai_err),
    ]


def _max_batch_rows(r: dict) -> list[dict]:
    device, err = r.get("device", ""), r.get("error", "")
    batch = r.get("largest_batch")
    peaks = r.get("peak_gib_by_batch") or {}
    cfg = r.get("config") or {"model": "base", "phases": 4, "size": 128}
    note = err or f"peak {peaks.get(str(batch))} GiB ({r.get('memory_metric')}); {r.get('volumes_per_s')} volumes/s"
    return [
        _row(f"largest MAE batch within {r.get('limit_gib', 22)} GiB ({cfg['model']}, {cfg['phases']} x "
             f"{cfg['size']}^3, checkpointing)",
             _number(batch) if batch else None, "volumes", device=device, note=note),
        _row("MAE model FLOP utilisation at that batch", _number(r.get("mfu")), "fraction", ">=", MAE_MFU, device,
             err),
    ]


def _inference_rows(r: dict, precision: str) -> list[dict]:
    cfg = r.get("config") or {"arch": "mtl_vit_base", "shape_TDHW": [3, 380, 190, 190]}
    shape = "x".join(str(v) for v in cfg["shape_TDHW"])
    note = r.get("error") or f"{r.get('windows_per_pass')} windows, {r.get('params')} parameters"
    return [_row(f"one real-size case ({shape}), predict_volume, {cfg['arch']}, {precision}",
                 _number(r.get("case_s_median")), "s", "<=", CASE_SECONDS, r.get("device", ""), note)]


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    if unit == "volumes":
        return f"{value:.0f}"
    return f"{value:.3g} {unit}".replace(" x", "x")


def _verdict(row: dict) -> str:
    if row["verdict"] in ("not measured", "reported"):
        return row["verdict"]
    margin = abs(row["margin"])
    # Fractions (MFU, fit-check error) differ by percentage points; other units by their own amount.
    by = f"{100 * margin:.1f} points" if row["unit"] == "fraction" else _fmt(margin, row["unit"])
    if row["verdict"] == "met":
        return f"met ({by} to spare)"
    return f"missed by {by} ({margin / row['target']:.0%} of the target)"


def _cell(text: str) -> str:
    return " ".join(str(text).replace("|", "/").split())  # one line, no column breaks


def summarise(out: Path, dry_run: bool = False) -> dict:
    results = {name: _read(out, name) for name in BENCHES}
    rows = (_finetune_rows(results["finetune_memory"]) + _mae_rows(results["mae_step"])
            + _max_batch_rows(results["mae_max_batch"]) + _inference_rows(results["inference_real"], "float32")
            + _inference_rows(results["inference_real_bf16"], "bf16 autocast"))
    runs = {}
    runs_file = out / "runs.tsv"
    if runs_file.is_file():
        for line in runs_file.read_text().splitlines():
            name, seconds, rc = line.split("\t")
            runs[name] = {"seconds": float(seconds), "exit_status": int(rc)}
    devices = sorted({r["device"] for r in results.values() if r.get("device")})
    failed = sorted(n for n, r in results.items() if "error" in r)
    summary = {"dry_run": dry_run, "date": datetime.date.today().isoformat(), "devices": devices,
               "seconds": round(sum(r["seconds"] for r in runs.values()), 1), "runs": runs, "failed": failed,
               "rows": rows}

    mark = " (dry-run)" if dry_run else ""
    lines = [f"# GPU suite{' DRY RUN' if dry_run else ''}: {', '.join(devices) or 'no device recorded'}", "",
             f"{summary['date']}, `bash bench/gpu_suite.sh OUT{' --dry-run' if dry_run else ''}`, "
             f"{summary['seconds']:.0f} s for {len(runs)} benches" + (f"; failed: {', '.join(failed)}" if failed
                                                                       else "") + ".", ""]
    if dry_run:
        lines += ["Dry run: test-size models at 32^3 on the CPU, so every value below is a dry-run value and no "
                  "verdict says anything about the targets, which are those of ViT-B on one H100/H200.", ""]
    lines += ["| figure | value | target | met? | device | note |", "|---|---|---|---|---|---|"]
    for row in rows:
        target = "-" if row["op"] is None else f"{row['op']} {_fmt(row['target'], row['unit'])}"
        value = _fmt(row["value"], row["unit"]) + (mark if row["value"] is not None else "")
        verdict = _verdict(row) + (mark if row["op"] and row["value"] is not None else "")
        cells = [row["figure"], value, target, verdict, row["device"], row["note"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "Files: " + ", ".join(f"`{n}.json`" for n in BENCHES) + " (one per bench, device named in each)."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the suite's output folder")
    p.add_argument("--dry-run", action="store_true", help="mark every value as a dry-run value")
    args = p.parse_args(argv)
    summary = summarise(Path(args.out), args.dry_run)
    print((Path(args.out) / "summary.md").read_text())
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
