"""Results on disk and on screen: merged JSON, a markdown table per op with the goals, PNG sweep plots."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

COLUMNS = (  # (header, record key, format)
    ("fwd ms", "fwd_ms", "{:.4g}"),
    ("bwd ms", "bwd_ms", "{:.4g}"),
    ("fwd+bwd ms", "full_ms", "{:.4g}"),
    ("peak MiB", "peak_mib", "{:.1f}"),
    ("GB/s", "gbps", "{:.3g}"),
    ("% copy", "pct_copy", "{:.3g}%"),
    ("speedup", "speedup", "{:.3g}x"),
    ("items/s", "items_per_s", "{:.1f}"),
)


def run_meta(config, copy_gbps: float, command: str) -> dict:
    """Device, versions, command, commit and date of a run, stored with its results."""
    import triton

    versions = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                "cuda": torch.version.cuda or "none"}
    for package in ("liger-kernel", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "device_name": torch.cuda.get_device_name(config.device) if config.cuda else f"cpu {platform.machine()}",
        "cuda": config.cuda, "smoke": config.smoke, "versions": versions, "copy_gbps": copy_gbps,
        "command": command, "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def device_stem(meta: dict) -> str:
    """``nvidia-h100-80gb-hbm3`` from the device name; ``-smoke`` marks a smoke run."""
    stem = re.sub(r"[^a-z0-9]+", "-", meta["device_name"].lower()).strip("-")
    return stem + ("-smoke" if meta["smoke"] else "")


# ---- goals (reported on the GPU run, never asserted) ----------------------------------------------------------

def is_headline(record: dict) -> bool:
    return record["headline"]


@dataclass
class Goal:
    op: str
    text: str
    relation: str  # ">=" or "<="
    target: float
    value: Callable[[dict], Optional[float]]  # provider name -> record of the selected case
    unit: str = "x"
    select: Callable[[dict], bool] = is_headline  # which of the op's records form the case (default: headline)


def _ok(by_provider: dict, names) -> Optional[dict]:
    """First provider of ``names`` (preference order) that ran."""
    for name in (names,) if isinstance(names, str) else names:
        record = by_provider.get(name)
        if record is not None and record["status"] == "ok":
            return record
    return None


def _ratio(ours, base, key: str = "main", inverse: bool = False) -> Callable[[dict], Optional[float]]:
    """``base/ours`` of the main time (a speedup), or ``ours/base`` of ``key`` with ``inverse``."""
    def value(by_provider):
        a, b = _ok(by_provider, ours), _ok(by_provider, base)
        if a is None or b is None:
            return None
        if key == "main":
            a_v, b_v = _main(a), _main(b)
            return b_v / a_v if a_v and b_v else None
        if a.get(key) is None or not b.get(key):
            return None
        return a[key] / b[key] if inverse else b[key] / a[key]
    return value


def _field(provider: str, key: str) -> Callable[[dict], Optional[float]]:
    return lambda by_provider: (_ok(by_provider, provider) or {}).get(key)


def _main(record: dict) -> Optional[float]:
    return record["full_ms"] if record.get("full_ms") is not None else record.get("fwd_ms")


def _param(**wanted) -> Callable[[dict], bool]:
    """Selects the case whose ``params`` (and ``op``, for ops benchmarked in another op's file) match."""
    return lambda record: all((record.get("params") or {}).get(k, record.get(k)) == v for k, v in wanted.items())


def _per_bare_launch(key: str) -> Callable[[dict], Optional[float]]:
    """The fused op's time (``key``) in units of one bare Triton launch's forward, from the same case."""
    def value(by_provider):
        ours, bare = _ok(by_provider, OURS_FUSED), _ok(by_provider, "bare")
        if ours is None or bare is None or ours.get(key) is None or not bare.get("fwd_ms"):
            return None
        return ours[key] / bare["fwd_ms"]
    return value


OURS_LINEAR = ("cuda", "triton")
OURS_FUSED = ("cuda", "triton")  # the CUDA extension where an op has one (linear_score), else Triton
HOST_OVERHEAD_OPS = ("score_distribution", "pairwise_gap", "slice_kl", "linear_score", "group_advantages",
                     "gdso_rewards")
WITH_BACKWARD = ("score_distribution", "pairwise_gap", "slice_kl", "linear_score")


def _host_overhead_goals() -> tuple:
    goals = []
    for name in HOST_OVERHEAD_OPS:
        case = _param(fused_op=name)
        goals.append(Goal("overhead", f"{name} fwd, in bare launches", "<=", 3.0, _per_bare_launch("fwd_ms"),
                          select=case))
        if name in WITH_BACKWARD:
            goals.append(Goal("overhead", f"{name} fwd+bwd, in bare launches", "<=", 8.0,
                              _per_bare_launch("full_ms"), select=case))
        goals.append(Goal("overhead", f"{name} vs eager reference", ">=", 1.0, _ratio(OURS_FUSED, "eager"),
                          select=case))
    return tuple(goals)


GOALS = (
    # The backward writes the dense [N, V] logits gradient: at large N the floor is that write's bandwidth.
    Goal("score_distribution", "fwd+bwd, % of copy bandwidth", ">=", 90.0, _field("triton", "pct_copy"), "%"),
    Goal("score_distribution", "fwd+bwd vs eager", ">=", 3.0, _ratio("triton", "eager"), select=_param(N=1024)),
    Goal("slice_kl", "vocab mode, fwd+bwd, % of copy bandwidth", ">=", 85.0, _field("triton", "pct_copy"), "%"),
    Goal("slice_kl", "vocab mode, fwd+bwd vs eager", ">=", 3.0, _ratio("triton", "eager")),
    Goal("slice_kl", "vocab mode, fwd+bwd vs torch.compile", ">=", 1.3, _ratio("triton", "compile")),
    Goal("slice_kl", "vocab mode, fwd+bwd vs Liger (ahead)", ">=", 1.0, _ratio("triton", "liger")),
    Goal("pairwise_gap", "fwd+bwd vs eager", ">=", 5.0, _ratio("triton", "eager")),
    Goal("pairwise_gap", "fwd+bwd vs torch.compile", ">=", 1.5, _ratio("triton", "compile")),
    Goal("pairwise_gap", "gdso_rewards vs torch.compile", ">=", 1.0, _ratio("triton", "compile"),
         select=_param(op="gdso_rewards", P=4096, G=16)),
    Goal("group_advantages", "vs torch.compile", ">=", 1.0, _ratio("triton", "compile")),
    Goal("linear_score", "fwd+bwd vs eager slice route", ">=", 3.0, _ratio(OURS_LINEAR, "eager")),
    Goal("linear_score", "fwd+bwd vs full LM-head logits", ">=", 100.0, _ratio(OURS_LINEAR, "naive")),
    Goal("student_scoring", "images/s vs naive transformers", ">=", 2.0,
         _ratio("ours", "naive", "items_per_s", inverse=True)),
    Goal("student_scoring", "peak memory vs naive transformers", "<=", 0.5,
         _ratio("ours", "naive", "peak_mib", inverse=True)),
    *_host_overhead_goals(),
)


def goal_rows(ops: dict) -> list:
    """One row per goal whose op is in ``ops``: measured value on the op's headline case and met / not met."""
    rows = []
    for goal in GOALS:
        if goal.op not in ops:
            continue
        run = ops[goal.op]
        selected = [r for r in run["records"] if goal.select(r)]
        by_provider = {r["provider"]: r for r in selected}
        value = goal.value(by_provider) if by_provider else None
        if not selected:
            status = "n/a (case not in this run)"
        elif value is None:
            status = "n/a (provider skipped or failed)"
        elif run["meta"]["smoke"] or not run["meta"]["cuda"]:
            status = "not assessed (smoke/CPU run)"
        else:
            status = "met" if (value >= goal.target if goal.relation == ">=" else value <= goal.target) else "not met"
        measured = None if value is None else (f"{value:.1f}%" if goal.unit == "%" else f"{value:.2f}x")
        target = f"{goal.relation} {goal.target:g}{'%' if goal.unit == '%' else 'x'}"
        rows.append({"op": goal.op, "case": selected[0]["case"] if selected else None, "goal": goal.text,
                     "target": target, "measured": measured, "status": status})
    return rows


# ---- markdown ----------------------------------------------------------------------------------------------------

def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        "# Z-Reward kernel benchmarks", "",
        f"- device: **{meta['device_name']}**" + (" (smoke shapes)" if meta["smoke"] else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- command: `{meta['command']}`" + (f" at commit `{meta['commit']}`" if meta.get("commit") else ""),
        f"- device-to-device copy: {meta['copy_gbps']:.3g} GB/s (read + write), the roofline for % copy",
        "- times are medians; fwd+bwd is one forward and the backward of every output with a ones gradient; "
        "speedup is the baseline's time / the provider's time (fwd+bwd, or fwd for forward-only ops)", "",
    ]
    goals = goal_rows(data["ops"])
    if goals:
        lines += ["## Goals (headline shapes)", "", "| op | case | goal | target | measured | status |",
                  "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join([g["op"], g["case"] or "–", g["goal"], g["target"], g["measured"] or "–", g["status"]])
                  + " |" for g in goals]
        lines.append("")
    for op, run in data["ops"].items():
        records = run["records"]
        columns = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in records)]
        baseline = records[0]["baseline"] if records else "eager"
        lines += [f"## {op}", "", f"run: `{run['meta']['command']}`; speedup against `{baseline}`", "",
                  "| " + " | ".join(["case", "provider", *(c[0] for c in columns), "note"]) + " |",
                  "|---|---|" + "---:|" * len(columns) + "---|"]
        for r in records:
            note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
            cells = [_cell(r, key, fmt) for _, key, fmt in columns]
            lines.append("| " + " | ".join([r["case"], r["provider"], *cells, note]) + " |")
        lines.append("")
    return "\n".join(lines)


# ---- files ---------------------------------------------------------------------------------------------------------

def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write(records_by_op: dict, meta: dict, out_dir: Path) -> dict:
    """Merge this run's ops into ``<out>/<device>.json`` (ops not run now are kept), rewrite the markdown and
    the plots of the ops run now. Returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = device_stem(meta)
    json_path = out_dir / f"{stem}.json"
    data = json.loads(json_path.read_text()) if json_path.exists() else {"ops": {}}
    data["meta"] = meta
    for op, records in records_by_op.items():
        data["ops"][op] = {"meta": meta, "records": records}
    data = _json_safe(data)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(data) + "\n")
    paths = {"json": json_path, "md": md_path, "png": []}
    for op, records in records_by_op.items():
        png = out_dir / f"{stem}-{op}.png"
        if plot(op, records, meta, png):
            paths["png"].append(png)
    return paths


def plot(op: str, records: list, meta: dict, path: Path) -> bool:
    """Time of each provider against the swept size, one panel per series. False when nothing ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok" and r["x"] is not None and _main(r) is not None]
    series = list(dict.fromkeys(r["series"] for r in ok))
    if not series:
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, name in zip(axes[0], series):
        for provider in dict.fromkeys(r["provider"] for r in ok if r["series"] == name):
            points = sorted((r["x"], _main(r)) for r in ok if r["series"] == name and r["provider"] == provider)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
        x_name = next(r["x_name"] for r in ok if r["series"] == name)
        ax.set(xscale="log", yscale="log", xlabel=x_name, ylabel="ms (fwd+bwd, or fwd)", title=name)
        ax.legend(fontsize=8)
    fig.suptitle(f"{op} on {meta['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
