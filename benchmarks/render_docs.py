"""Render the measured tables of README.md and BENCHMARKS.md from committed JSON.

    python benchmarks/render_docs.py          # rewrite the marked sections
    python benchmarks/render_docs.py --check  # exit 1 if a document differs from its JSON

A section lies between ``<!-- render:NAME -->`` and ``<!-- /render:NAME -->``; NAME picks the
function below that renders it, from the JSON file it names.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _machine(m: dict) -> str:
    return f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), torch {m.get('torch', '?')}"


def exact_results() -> str:
    """The main results table: ELBO terms, exact log p(x), and IS against it."""
    r = _load("results/reproduce-cpu.json")
    ev = r["evaluations"]
    k = r["settings"]["num_samples"]
    lines = ["| model | recon | KL | -ELBO | -log p(x), exact | est. error | gap | "
             f"-log p(x), IS with q (K = {k}) | with a Student-t | exact, same images | "
             "bias (q, Student-t) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in ("vae", "cvae"):
        e = ev[kind]
        ex, lq, lt = e["exact_log_px"], e["log_px"], e["log_px_student_t"]
        lines.append(
            f"| {kind.upper()} | {e['elbo']['recon']:.2f} | {e['elbo']['kl']:.2f} | "
            f"**{e['elbo']['neg_elbo']:.2f}** | **{ex['neg_log_px']:.2f}** | "
            f"{ex['error_estimate']:.3f} | {ex['gap']:.2f} | {lq['neg_log_px']:.2f} | "
            f"{lt['neg_log_px']:.2f} | {-lq['exact_log_px']:.2f} | "
            f"{-lq['bias']:+.2f}, {-lt['bias']:+.2f} |")
    n_ex, n_is = ev["vae"]["exact_log_px"]["n"], ev["vae"]["log_px"]["n"]
    t = r["timings"]
    tol = ev["vae"]["exact_log_px"]["tolerance"]
    over = [ev[kind]["exact_log_px"]["over_tolerance"] for kind in ("vae", "cvae")]
    within = ("every image" if not any(over) else
              f"all but {over[0]:,} (VAE) and {over[1]:,} (CVAE) images")
    lines += ["", f"-ELBO, exact -log p(x) ({within} within {tol} nats by its estimated "
              "error; the column is the mean estimated error) and the gap on all "
              f"{n_ex:,} test "
              f"images; the IS columns on the first {n_is:,}, with the exact value on those "
              f"same images. Evaluation took {t['evaluation']:.0f} s of the report's "
              f"{t['total']:.0f} s on {_machine(r.get('machine', {}))} (the runs were given, "
              "not trained)."]
    return "\n".join(lines)


def exact_timing() -> str:
    """BENCHMARKS.md: the exact log p(x) over the whole test set."""
    r = _load("benchmarks/exact-logpx-cpu.json")
    m = r["machine"]
    lines = [f"Measured with `python benchmarks/exact_logpx.py RUN ... --out "
             f"benchmarks/exact-logpx-cpu.json` on {_machine(m)}, {m['torch_threads']} torch "
             f"threads, tolerance {r['tolerance']} nats per image.", "",
             "| run | model | images | seconds | load average before | decoder calls | own "
             "rules | above the tolerance | -log p(x) | est. error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, x in r["runs"].items():
        load = x.get("loadavg_before")
        lines.append(f"| {name} | {x['model']} | {x['n']:,} | {x['seconds']:.1f} | "
                     f"{'-' if load is None else f'{load[0]:.1f}'} | {x['nodes']:,} | "
                     f"{x['refined']:,} | {x['over_tolerance']:,} | {x['neg_log_px']:.2f} | "
                     f"{x['error_estimate']:.3f} |")
    return "\n".join(lines)


def exact_error_check() -> str:
    """BENCHMARKS.md: the per-image error estimate against a ladder of finer rules."""
    files = ("benchmarks/exact-error-check-vae-cpu.json",
             "benchmarks/exact-error-check-cvae-cpu.json")
    checks = [_load(f) for f in files]
    tol = checks[0]["tolerance"]
    lines = [f"Measured with `python benchmarks/exact_error_check.py RUN --images N --levels L "
             f"--out FILE` ({', '.join(f'`{f}`' for f in files)}) on "
             f"{_machine(checks[0]['machine'])}: a seeded sample of test images, each "
             "integrated with every shared rule of the ladder; the finest is the reference. "
             f"Accepted: error estimate <= {tol} nats; wrong: accepted but further than {tol} "
             "nats from the reference.", "",
             "| run | images | rule spacing | largest miss | vaelab's estimate: accepted, wrong "
             "| T and M alone: accepted, wrong |", "|---|---:|---:|---:|---:|---:|"]
    for r in checks:
        for name, x in r["runs"].items():
            for row in x["levels"]:
                v, n = row["vaelab"], row["t_and_m_alone"]
                lines.append(f"| {name} | {x['images']:,} | {row['spacing']:.4f} | "
                             f"{row['miss_max']:.3f} | {v['accepted']:,}, {v['wrong']:,} | "
                             f"{n['accepted']:,}, {n['wrong']:,} |")
            lines.append(f"| {name} | {x['images']:,} | {x['reference_spacing']:.4f} "
                         "(the reference) | | | |")
    return "\n".join(lines)


def sweep_timing() -> str:
    """BENCHMARKS.md: the ablation runs through the sweep against one after another (CPU)."""
    r = _load("benchmarks/sweep-cpu.json")
    m, s = r["machine"], r["settings"]
    cpu = m.get("lscpu", {}).get("Model name", m.get("cpu", "?"))
    limit = "all images" if s["limit"] is None else f"the first {s['limit']:,} images per split"
    lines = [f"Measured with `python benchmarks/sweep_bench.py --out benchmarks/sweep-cpu.json` "
             f"on {cpu} ({m.get('affinity_cores', m.get('cores', '?'))} cores), torch "
             f"{m.get('torch', '?')}: the {len(s['runs'])} runs `--ablations` adds "
             f"({', '.join(s['runs'])}), preset {s['preset']}, {s['epochs']} epoch(s), {limit}. "
             f"One after another: one process, {s['sequential_threads']} torch threads, or 1. "
             f"Sweep: a local Ray, {s['sweep_trials_at_once']} trials at once, "
             f"{s['sweep_threads_per_trial']} thread each, Ray's start and stop included.", "",
             "| round | one after another, s | the same, 1 thread, s | sweep, s | speed-up "
             "(against each) | load average before (1 min) | largest -ELBO difference |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for i, row in enumerate(r["rounds"], 1):
        a, one, b = (row["one_after_another"], row["one_after_another_1_thread"],
                     row["sweep"])
        diff = max(abs(x["neg_elbo"][n] - b["neg_elbo"][n]) for x in (a, one)
                   for n in b["neg_elbo"])
        lines.append(f"| {i} | {a['seconds']:.1f} | {one['seconds']:.1f} | {b['seconds']:.1f} | "
                     f"{a['seconds'] / b['seconds']:.2f}x, {one['seconds'] / b['seconds']:.2f}x "
                     f"| {a['loadavg_before'][0]:.1f}, {one['loadavg_before'][0]:.1f}, "
                     f"{b['loadavg_before'][0]:.1f} | {diff:.3f} |")
    if r.get("note"):
        lines += ["", r["note"]]
    return "\n".join(lines)


SECTIONS = {"exact-results": exact_results, "exact-timing": exact_timing,
            "exact-error-check": exact_error_check,
            "sweep-timing": sweep_timing}
DOCUMENTS = ("README.md", "BENCHMARKS.md")
PATTERN = re.compile(r"(<!-- render:([\w-]+) -->\n)(.*?)(<!-- /render:\2 -->)", re.S)


def render(text: str) -> str:
    return PATTERN.sub(lambda m: m.group(1) + SECTIONS[m.group(2)]() + "\n" + m.group(4), text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    stale = []
    for doc in DOCUMENTS:
        path = ROOT / doc
        old = path.read_text()
        new = render(old)
        if new != old:
            stale.append(doc)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"out of date with their JSON: {', '.join(stale)} "
              "(run python benchmarks/render_docs.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
