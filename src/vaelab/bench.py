"""``vaelab bench``: vaelab's training and evaluation against the plain tutorial recipe.

The contenders run in one process, alternating round by round so that machine drift (thermal,
other load) hits both. For throughput the reference (``vaelab.bench_reference``) uses vaelab's
own network, so the ratio compares only how the training is driven: data pipeline,
synchronisation, memory format, optimiser implementation. Time to quality compares whole
recipes: vaelab's defaults against the tutorial loop with the study's plain network.

The report goes to ``--out`` (default ``bench.md`` in the current folder) with its JSON beside
it (``bench.json``); the repository's BENCHMARKS.md is rendered from committed JSON by
``benchmarks/render_docs.py``, never written by a measurement.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vaelab import bench_reference as ref
from vaelab.backends import keeps_process_rng
from vaelab.config import resolve_config
from vaelab.data import Dataset, load_dataset
from vaelab.errors import ConfigError
from vaelab.evaluate import evaluate_elbo
from vaelab.io import atomic_write_text
from vaelab.literature import STUDY
from vaelab.models import build_model
from vaelab.training import Trainer, cpu_bf16_hardware, versions

# the study's test -ELBO of each model (nats per image), the target of time_to_quality
STUDY_NEG_ELBO = {kind: STUDY[kind]["neg_elbo"] for kind in ("vae", "cvae")}
CPUINFO = Path("/proc/cpuinfo")


def _vaelab_trainer(model: str, ds: Dataset, run_dir: Path, **overrides: Any) -> Trainer:
    cfg = resolve_config("study", model=model, dataset=ds.name, **overrides)
    return Trainer(cfg, run_dir, dataset=ds, progress=False, force=True)


def _time_vaelab_steps(trainer: Trainer, steps: int) -> tuple[float, int]:
    """(seconds, images) of ``steps`` training steps exactly as ``Trainer.fit`` runs them; the
    images are the trainer's own count of what it trained on (an epoch's last batch may be
    short)."""
    before = int(trainer.sums["count"])
    it = trainer.batcher.epoch(trainer.epoch)
    done = 0
    t0 = time.perf_counter()
    while done < steps:
        for x, y in it:
            trainer.train_step(x, y)
            done += 1
            if done == steps:
                break
        else:
            trainer.epoch += 1
            it = trainer.batcher.epoch(trainer.epoch)
    images = int(trainer.sums["count"])  # one sync at the end, as the trainer's refresh does
    return time.perf_counter() - t0, images - before


@keeps_process_rng
def throughput(ds: Dataset, model: str, *, rounds: int, steps: int, device: str,
               batch_size: int = 128, precision: str = "auto", pythae: bool = True,
               fp32_too: bool = False) -> dict[str, Any]:
    """Images/s of vaelab's training step (at ``precision``), of the reference and of pythae's
    ``TrainingPipeline`` (``vaelab.bench_pythae``; left out, with ``pythae_missing`` saying why,
    when it is not installed or ``pythae`` is False), all on the same network, alternating
    rounds: vaelab, reference, pythae. With ``fp32_too`` and vaelab at bf16, vaelab at fp32 joins
    the rotation too, so what bf16 contributes is measured under the same load.

    Each contender's rate is the median over rounds of (images it trained on) / (seconds),
    with both counts kept per round in ``per_round``; ``ratio`` is vaelab / reference and
    ``pythae_ratio`` vaelab / pythae, each of those medians.
    """
    from vaelab import bench_pythae

    if rounds < 1 or steps < 1:
        raise ConfigError(f"rounds and steps must be >= 1, got {rounds} and {steps}")
    missing = bench_pythae.pythae_missing() if pythae else "left out (--no-pythae)"
    per_round = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _vaelab_trainer(model, ds, Path(tmp) / "run", device=device,
                                  precision=precision)
        fp32 = None
        if fp32_too and trainer.precision != "fp32":
            fp32 = _vaelab_trainer(model, ds, Path(tmp) / "fp32", device=device,
                                   precision="fp32")
        torch.manual_seed(0)
        ref_model = build_model(trainer.spec)
        contender = None
        try:
            if missing is None:
                torch.manual_seed(0)  # the reference's initialisation, in pythae's wrappers
                contender = bench_pythae.PythaeContender(build_model(trainer.spec), ds.train,
                                                         steps=steps, batch_size=batch_size,
                                                         device=device)
            _time_vaelab_steps(trainer, 5)  # warm-up
            if fp32 is not None:
                _time_vaelab_steps(fp32, 5)
            ref.train_reference(ref_model, ds.train, epochs=1, max_steps=5, device=device,
                                batch_size=batch_size)
            for _ in range(rounds):
                seconds, images = _time_vaelab_steps(trainer, steps)
                row = {"vaelab_images": images, "vaelab_seconds": seconds}
                r = ref.train_reference(ref_model, ds.train, epochs=1, max_steps=steps,
                                        device=device, batch_size=batch_size)
                row.update(reference_images=r["images"], reference_seconds=r["seconds"])
                if contender is not None:
                    p = contender.round()
                    row.update(pythae_images=p["images"], pythae_seconds=p["seconds"])
                if fp32 is not None:
                    seconds, images = _time_vaelab_steps(fp32, steps)
                    row.update(vaelab_fp32_images=images, vaelab_fp32_seconds=seconds)
                per_round.append(row)
        finally:
            trainer.close()
            if fp32 is not None:
                fp32.close()
            if contender is not None:
                contender.close()
    out: dict[str, Any] = {"precision": trainer.precision, "batch_size": batch_size,
                           "rounds": rounds, "steps": steps}
    for name in ("vaelab", "reference", "pythae", "vaelab_fp32"):
        if f"{name}_images" in per_round[0]:
            out[name] = statistics.median(p[f"{name}_images"] / p[f"{name}_seconds"]
                                          for p in per_round)
    out["ratio"] = out["vaelab"] / out["reference"]
    if "pythae" in out:
        out["pythae_ratio"] = out["vaelab"] / out["pythae"]
        out["pythae_version"] = bench_pythae.pythae_version()
    else:
        out["pythae_missing"] = missing
    if "vaelab_fp32" in out:
        out["bf16_gain"] = out["vaelab"] / out["vaelab_fp32"]
    out["per_round"] = per_round
    return out


def training_flops_per_image(model: str, *, batch_size: int = 128) -> float:
    """FLOPs of one training step (forward, backward; the Adam update is not counted) per image,
    counted by ``torch.utils.flop_counter`` on vaelab's study-preset network. Both contenders run
    this same network, so it is the work per image whichever loop drives it."""
    from torch.utils.flop_counter import FlopCounterMode

    from vaelab.objectives import elbo_terms, training_loss

    with torch.random.fork_rng(devices=[]):  # the caller's generator is left as it was
        torch.manual_seed(0)
        net = build_model(resolve_config("study", model=model).model_spec())
        x = torch.rand(batch_size, 1, 28, 28)
        y = torch.arange(batch_size) % 10
        with FlopCounterMode(display=False) as counter:
            out = net(x, y if net.conditional else None)
            training_loss(elbo_terms(x, out.mu, out.logvar, out.logits), 1.0).backward()
    return counter.get_total_flops() / batch_size


def matmul_peak_gflops(device: str, *, n: int = 2048, repeats: int = 5) -> float:
    """The best fp32 GFLOP/s of an n x n matrix product on ``device`` with torch's threads: a
    practical ceiling for a network whose work is convolutions and matrix products."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def roofline(throughput_result: dict[str, Any], flops_per_image: float,
             peak_gflops: float) -> dict[str, Any]:
    """What each contender's images/s mean in GFLOP/s and as a share of the matmul peak, and the
    share that 2x the reference would need."""
    g = flops_per_image / 1e9
    return {
        "flops_per_image": flops_per_image, "peak_gflops": peak_gflops,
        "vaelab_gflops": throughput_result["vaelab"] * g,
        "reference_gflops": throughput_result["reference"] * g,
        "vaelab_of_peak": throughput_result["vaelab"] * g / peak_gflops,
        "reference_of_peak": throughput_result["reference"] * g / peak_gflops,
        "twice_reference_of_peak": 2 * throughput_result["reference"] * g / peak_gflops,
    }


@keeps_process_rng
def time_to_quality(ds: Dataset, model: str, *, device: str, max_epochs: int = 30,
                    target: float | None = None, log=print) -> dict[str, Any]:
    """Training seconds (evaluation excluded) until the test -ELBO first reaches the study's
    number: vaelab's study preset (its architecture, cosine lr, its training loop) against the
    reference recipe (the tutorial loop, constant lr, the study's plain network)."""
    target = STUDY_NEG_ELBO[model] if target is None else target
    out: dict[str, Any] = {"target": target}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _vaelab_trainer(model, ds, Path(tmp) / "run", device=device, epochs=max_epochs)
        reached = None
        seconds = 0.0
        while trainer.epoch < max_epochs:
            trainer._run_epoch(None, None)
            row = trainer.metrics[-1]
            seconds += row["seconds"]
            log(f"  vaelab {model} epoch {row['epoch']}: test -ELBO {row['test_neg_elbo']:.2f}")
            if row["test_neg_elbo"] <= target:
                reached = (row["epoch"], seconds)
                break
        out["vaelab"] = _reached(reached, seconds)

        torch.manual_seed(0)
        ref_model = build_model(ref.tutorial_spec(model))
        eval_seconds = 0.0
        state: dict[str, Any] = {"reached": None}

        def on_epoch_end(epoch: int, elapsed: float) -> bool:
            nonlocal eval_seconds
            train_seconds = elapsed - eval_seconds
            t0 = time.perf_counter()
            ev = evaluate_elbo(ref_model, ds.test)
            ref_model.train()
            eval_seconds += time.perf_counter() - t0
            log(f"  reference {model} epoch {epoch + 1}: test -ELBO {ev['neg_elbo']:.2f}")
            if ev["neg_elbo"] <= target:
                state["reached"] = (epoch + 1, train_seconds)
                return True
            return False

        r = ref.train_reference(ref_model, ds.train, epochs=max_epochs,
                                on_epoch_end=on_epoch_end, device=device)
        out["reference"] = _reached(state["reached"], r["seconds"] - eval_seconds)
    v, rr = out["vaelab"]["seconds"], out["reference"]["seconds"]
    out["ratio"] = v / rr if out["vaelab"]["reached"] and out["reference"]["reached"] else None
    return out


def _reached(reached: tuple[int, float] | None, seconds: float) -> dict[str, Any]:
    if reached is None:
        return {"reached": False, "epoch": None, "seconds": seconds}
    return {"reached": True, "epoch": reached[0], "seconds": reached[1]}


@keeps_process_rng
def evaluation_speed(ds: Dataset, model: str, *, device: str, num_samples: int,
                     logpx_images: int = 500) -> dict[str, Any]:
    """Seconds for the test -ELBO over the whole test set, and for the importance-sampled
    log p(x) with ``num_samples`` samples per image, measured on the first ``logpx_images`` test
    images and scaled linearly to the whole test set (the cost is the same for every image; an
    untrained model of the same shape does the same work as a trained one)."""
    from vaelab import evaluate

    spec = resolve_config("study", model=model).model_spec()
    torch.manual_seed(0)
    m = build_model(spec).to(device)
    t0 = time.perf_counter()
    evaluate_elbo(m, ds.test)
    t_elbo = time.perf_counter() - t0
    out: dict[str, Any] = {"test_elbo_s": t_elbo, "images": len(ds.test)}
    if num_samples and hasattr(evaluate, "log_px_estimate"):
        part = ds.test.subset(logpx_images)
        t0 = time.perf_counter()
        evaluate.log_px_estimate(m, part, num_samples=num_samples)
        seconds = time.perf_counter() - t0
        out.update({"log_px_measured_s": seconds, "log_px_measured_images": len(part),
                    "log_px_s": seconds * len(ds.test) / max(len(part), 1),
                    "num_samples": num_samples})
    return out


def exact_speed(run_dir: str | os.PathLike, *, tolerance: float = 0.1,
                device: str = "cpu") -> dict[str, Any]:
    """Seconds and decoder calls of the exact log p(x) (quadrature) over a trained 2-D run's
    whole test set, with its summary (``ExactLogPx.summary``). A trained run, not an untrained
    model of its shape: the work depends on how narrow the posteriors are."""
    from vaelab.checkpoint import load_run
    from vaelab.evaluate import dataset_for_run, exact_log_px_per_image

    run = load_run(run_dir, device=device)
    test = dataset_for_run(run).test
    t0 = time.perf_counter()
    res = exact_log_px_per_image(run.model, test, tolerance=tolerance,
                                 likelihood=run.config["config"]["likelihood"], device=device)
    seconds = time.perf_counter() - t0
    return {"run": str(run_dir), "model": run.spec.kind, "seconds": seconds, **res.summary()}


def peak_rss_of_training(dataset: str, *, limit: int | None = None,
                         val_size: int = 100) -> float:
    """Peak RSS (MB) of a real `vaelab train` process: one epoch of the study preset (on the
    first ``limit`` images of each split when given: the whole data set is loaded either way).

    The figure is that process's own (``os.wait4``), not the largest of every child this
    process has had (``RUSAGE_CHILDREN``). The process starts in an empty temporary folder, so
    no ``vaelab`` package lying in the current folder can stand in for the installed one.
    """
    if dataset.strip().lower().startswith("idx:"):  # the child runs elsewhere: a full path
        dataset = "idx:" + str(Path(dataset.strip()[4:]).expanduser().resolve())
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "vaelab", "train", "--model", "vae", "--epochs", "1",
               "--dataset", dataset, "--out", str(Path(tmp) / "run"), "--quiet"]
        if limit:
            cmd += ["--limit", str(limit), "--val-size", str(val_size)]
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                err.seek(0)
                why = err.read().decode(errors="replace").strip().splitlines()
                raise ConfigError("the training process for the peak-RSS figure failed: "
                                  + (why[-1] if why else f"exit code {proc.returncode}"))
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    return usage.ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)


def machine() -> dict[str, Any]:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_bf16": cpu_bf16_hardware() or "none", **versions()}
    try:  # the first processor's name, vendor, family and model (a VM's name may be generic)
        fields: dict[str, str] = {}
        for line in CPUINFO.read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        if fields.get("model name"):
            info["cpu"] = fields["model name"]
        if fields.get("cpu family") and fields.get("model"):
            info["cpu_id"] = (f"{fields.get('vendor_id', '?')} family {fields['cpu family']} "
                              f"model {fields['model']}")
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(Markdown report, JSON) for ``--out``: ``X.md`` and ``X.json`` for ``--out X.json``,
    else ``out`` itself and the same name with ``.json``. Refused now, before minutes of
    measuring, if either cannot be written."""
    out = Path(out)
    md, js = (out.with_suffix(".md"), out) if out.suffix.lower() == ".json" else \
        (out, out.with_suffix(".json"))
    for path in (md, js):
        if path.is_dir():
            raise ConfigError(f"--out {path} is a folder: name a file, e.g. {path / 'bench.md'}")
        above = path.parent
        while not above.exists() and above != above.parent:
            above = above.parent
        if not above.is_dir():
            raise ConfigError(f"cannot write {path}: {above} is a file, not a folder")
        if not os.access(above, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write {path}: {above} cannot be written")
    return md, js


def run_bench(*, models: tuple[str, ...] = ("vae", "cvae"), rounds: int = 3, steps: int = 40,
              device: str = "auto", quality: bool = False, num_samples: int = 1000,
              dataset: str = "mnist", out: str | os.PathLike | None = None, log=print,
              rss_limit: int = 10000, val_size: int = 5000,
              exact_runs: tuple[str | os.PathLike, ...] = (), tolerance: float = 0.1,
              precision: str = "auto", pythae: bool = True, fp32_too: bool = False,
              ) -> dict[str, Any]:
    """The whole benchmark; writes the Markdown report and its JSON (``report_paths(out)``)
    when ``out`` is given. ``precision`` is vaelab's in the throughput rounds (the reference
    and pythae train in fp32, as they are written); ``pythae`` and ``fp32_too`` as in
    ``throughput``."""
    from vaelab.bench_pythae import pythae_missing
    from vaelab.training import pick_device

    for name, value in (("rounds", rounds), ("steps", steps), ("rss_limit", rss_limit)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if num_samples < 0:
        raise ConfigError(f"num_samples must be >= 0, got {num_samples}")
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"unknown precision {precision!r}: choose auto, fp32 or bf16")
    paths = report_paths(out) if out is not None else None
    for run_dir in exact_runs:  # refuse a bad run before anything is measured
        from vaelab.checkpoint import load_run
        from vaelab.evaluate import _check_exact_latent

        _check_exact_latent(load_run(run_dir).model)

    dev = str(pick_device(device))
    ds = load_dataset(dataset, val_size=val_size)
    results: dict[str, Any] = {"machine": machine(), "device": dev, "models": {},
                               "load_average": {"start": _load_average()}}
    missing = pythae_missing() if pythae else None
    if missing:
        log(missing)
    peak = matmul_peak_gflops(dev)  # one ceiling for every model
    for model in models:
        log(f"{model}: throughput: {rounds} alternating rounds of {steps} steps")
        r: dict[str, Any] = {"throughput": throughput(
            ds, model, rounds=rounds, steps=steps, device=dev, precision=precision,
            pythae=pythae, fp32_too=fp32_too)}
        r["roofline"] = roofline(r["throughput"], training_flops_per_image(model), peak)
        log(f"{model}: evaluation speed")
        r["evaluation"] = evaluation_speed(ds, model, device=dev, num_samples=num_samples)
        if quality:
            log(f"{model}: time to the study's quality")
            r["time_to_quality"] = time_to_quality(ds, model, device=dev, log=log)
        results["models"][model] = r
    if exact_runs:
        results["exact"] = []
    for run_dir in exact_runs:
        log(f"{run_dir}: exact log p(x) over its test set")
        results["exact"].append(exact_speed(run_dir, tolerance=tolerance, device=dev))
    log("peak RSS of a training process")
    results["peak_rss_mb"] = peak_rss_of_training(dataset, limit=rss_limit)
    results["load_average"]["end"] = _load_average()
    argv = sys.argv[1:] if sys.argv and sys.argv[1:2] == ["bench"] else ["bench"]
    results["command"] = "vaelab " + " ".join(argv)
    if paths is not None:
        md, js = paths
        atomic_write_text(js, json.dumps(results, indent=2) + "\n")
        atomic_write_text(md, markdown(results))
    return results


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the system has none): other work on
    the machine slows every contender alike in alternating rounds, but it belongs in the
    report."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def throughput_table(models: dict[str, Any]) -> list[str]:
    """The throughput table's lines (bench.md and BENCHMARKS.md), and one line for a pythae
    left out."""
    ts = [r["throughput"] for r in models.values()]
    has_p = any("pythae" in t for t in ts)
    has_f = any("vaelab_fp32" in t for t in ts)
    head = "| model | vaelab | reference |" + (" pythae |" if has_p else "") + \
        (" vaelab fp32 |" if has_f else "") + " vaelab / reference |" + \
        (" vaelab / pythae |" if has_p else "") + (" bf16 gain |" if has_f else "")
    lines = [head, "|---" + "|---:" * (head.count("|") - 2) + "|"]

    def num(t: dict[str, Any], key: str) -> str:
        return f" {t[key]:,.0f} |" if key in t else " - |"

    def ratio(t: dict[str, Any], key: str) -> str:
        return f" {t[key]:.2f}x |" if key in t else " - |"

    for name, t in zip(models, ts, strict=True):
        prec = t.get("precision", "fp32")
        lines.append(f"| {name} | {t['vaelab']:,.0f} ({prec}) |" + num(t, "reference")
                     + (num(t, "pythae") if has_p else "")
                     + (num(t, "vaelab_fp32") if has_f else "") + ratio(t, "ratio")
                     + (ratio(t, "pythae_ratio") if has_p else "")
                     + (ratio(t, "bf16_gain") if has_f else ""))
    missing = {t["pythae_missing"] for t in ts if t.get("pythae_missing")}
    for m in sorted(missing):
        lines += ["", f"pythae: {m}"]
    return lines


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Benchmarks", "",
        f"Measured with `{results['command']}` on {m['cpu']} ({m['cores']} cores, "
        f"{m['torch_threads']} torch threads), device `{results['device']}`, torch "
        f"{m['torch']}, Python {m['python']}.", "",
        "## Training throughput (images/s, study preset's network for all, batch 128, median "
        "of alternating rounds)", "", *throughput_table(results["models"]),
    ]
    load = results.get("load_average") or {}
    if load.get("start") and load.get("end"):
        lines += ["", f"Load average (1, 5, 15 min) {load['start']} at the start, "
                  f"{load['end']} at the end: other work slows each contender alike in "
                  "alternating rounds."]
    if all("roofline" in r for r in results["models"].values()):
        lines += ["", "## Against the machine's ceiling", "",
                  "Work per image counted by `torch.utils.flop_counter` (forward and backward of "
                  "the network both contenders run); the ceiling is the best fp32 rate of a "
                  "2048 x 2048 matrix product here.", "",
                  "| model | MFLOP / image | ceiling GFLOP/s | vaelab | reference "
                  "| 2x reference would need |", "|---|---:|---:|---:|---:|---:|"]
        for name, r in results["models"].items():
            f = r["roofline"]
            lines.append(
                f"| {name} | {f['flops_per_image'] / 1e6:.1f} | {f['peak_gflops']:.0f} | "
                f"{f['vaelab_gflops']:.0f} GFLOP/s ({f['vaelab_of_peak']:.0%}) | "
                f"{f['reference_gflops']:.0f} GFLOP/s ({f['reference_of_peak']:.0%}) | "
                f"{f['twice_reference_of_peak']:.0%} of the ceiling |")
    lines += ["", "## Evaluation (seconds over the 10,000 test images)", "",
              "| model | test -ELBO | log p(x), K samples |", "|---|---:|---:|"]
    for name, r in results["models"].items():
        e = r["evaluation"]
        lp = (f"{e['log_px_s']:.0f} (K = {e['num_samples']}; measured on "
              f"{e['log_px_measured_images']:,} images in {e['log_px_measured_s']:.1f} s, "
              "scaled to the whole set)") if "log_px_s" in e else "-"
        lines.append(f"| {name} | {e['test_elbo_s']:.2f} | {lp} |")
    if results.get("exact"):
        lines += ["", "## Exact log p(x) by quadrature (trained runs, whole test set)", "",
                  "| run | model | images | seconds | decoder calls | tolerance, nats per "
                  "image | over it | mean est. error | -log p(x) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for x in results["exact"]:
            lines.append(f"| {x['run']} | {x['model']} | {x['n']:,} | {x['seconds']:.1f} | "
                         f"{x['nodes']:,} | {x['tolerance']} | {x['over_tolerance']:,} | "
                         f"{x['error_estimate']:.3f} | {x['neg_log_px']:.2f} |")
    if any("time_to_quality" in r for r in results["models"].values()):
        lines += ["", "## Time to the study's quality (training seconds, evaluation excluded)",
                  "", "| model | target -ELBO | vaelab | reference | ratio |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in results["models"].items():
            q = r.get("time_to_quality")
            if not q:
                continue

            def cell(c: dict[str, Any]) -> str:
                if not c["reached"]:
                    return f"not reached ({c['seconds']:.0f} s)"
                return f"{c['seconds']:.0f} s (epoch {c['epoch']})"

            ratio = f"{q['ratio']:.2f}" if q["ratio"] is not None else "-"
            lines.append(f"| {name} | {q['target']} | {cell(q['vaelab'])} | "
                         f"{cell(q['reference'])} | {ratio} |")
    lines += ["", f"Peak RSS of a one-epoch `vaelab train` process: "
              f"{results['peak_rss_mb']:,.0f} MB.", ""]
    return "\n".join(lines)
