"""Tests for vaelab.plots and `vaelab plot`: tiny untrained models, synthetic data, fast."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from synthetic import uniform_noise, write_synthetic
from vaelab import plots
from vaelab.checkpoint import Run
from vaelab.data import Dataset, Split
from vaelab.errors import ConfigError
from vaelab.models import ModelSpec, build_model

T = 28 + plots.PAD  # tile pitch of a padded grid


def grid_size(count: int) -> int:
    """Pixels spanned by ``count`` padded tiles."""
    return count * T - plots.PAD


def tiny(kind: str, latent_dim: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    spec = ModelSpec(kind=kind, latent_dim=latent_dim, channels=(8, 16), enc_hidden=32,
                     dec_hidden=32)
    return build_model(spec)


@pytest.fixture
def vae():
    return tiny("vae")


@pytest.fixture
def cvae():
    return tiny("cvae")


@pytest.fixture(scope="module")
def split() -> Split:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8))
    return Split(images, torch.arange(40) % 10)


def make_metrics(epochs: int = 4, val: bool = True) -> list[dict[str, Any]]:
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "beta": min(1.0, e / 2)}
        for s in ("train", "val", "test") if val else ("train", "test"):
            row |= {f"{s}_recon": 200.0 - 10 * e, f"{s}_kl": 2.0 + e,
                    f"{s}_neg_elbo": 202.0 - 9 * e, f"{s}_kl_per_dim": [1.0, 1.0 + e]}
        rows.append(row)
    return rows


class DecodeSpy:
    """Wraps ``model.decode``; records every call's inputs and the model's state at the time."""

    def __init__(self, model, monkeypatch) -> None:
        self.calls: list[dict[str, Any]] = []
        original = model.decode

        def decode(z, y=None):
            self.calls.append({
                "z": z.detach().cpu().numpy().copy(),
                "y": None if y is None else y.detach().cpu().numpy().copy(),
                "training": model.training,
                "inference": torch.is_inference_mode_enabled(),
            })
            return original(z, y)

        monkeypatch.setattr(model, "decode", decode)


def image_of(ax) -> np.ndarray:
    assert len(ax.images) == 1
    return np.asarray(ax.images[0].get_array())


def tick_texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def test_grid_tiles_row_major_with_padding_and_blank_cells():
    images = np.stack([np.full((28, 28), v, np.float32) for v in (0.2, 0.4, 0.6)])
    g = plots._grid(images, 2, pad=2, pad_value=0.9)
    assert g.shape == (58, 58)
    assert g[0, 0] == pytest.approx(0.2) and g[0, 30] == pytest.approx(0.4)
    assert g[30, 0] == pytest.approx(0.6) and g[30, 30] == 0.0  # a blank cell past the end
    assert g[0, 28] == pytest.approx(0.9) and g[28, 0] == pytest.approx(0.9)  # padding
    assert plots._grid(images, 3, pad=0).shape == (28, 84)


def test_slerp_keeps_norms_and_ends_and_lerp_is_straight():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 2.0], [2.0, 2.0]])  # last pair parallel: lerp fallback
    t = torch.linspace(0, 1, 5)
    s = plots._slerp(a, b, t).numpy()
    straight = plots._lerp(a, b, t).numpy()
    assert s.shape == straight.shape == (3, 5, 2)
    np.testing.assert_allclose(s[:, 0], a.numpy(), atol=1e-6)
    np.testing.assert_allclose(s[:, -1], b.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(s[0], axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(s[1], axis=-1), 2.0, rtol=1e-6)
    np.testing.assert_allclose(s[2], straight[2], atol=1e-6)
    np.testing.assert_allclose(straight[0, 2], [0.5, 0.5], atol=1e-6)


def test_decode_means_is_one_call_in_eval_and_inference_mode(vae, monkeypatch):
    spy = DecodeSpy(vae, monkeypatch)
    vae.train()
    out = plots._decode_means(vae, torch.zeros(7, 2))
    assert out.shape == (7, 28, 28) and 0.0 <= out.min() and out.max() <= 1.0
    assert len(spy.calls) == 1
    assert spy.calls[0]["training"] is False and spy.calls[0]["inference"] is True
    assert vae.training  # the caller's mode is restored


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def test_training_curves_three_panels_with_beta_axes():
    fig = plots.training_curves(make_metrics())
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6  # three panels and their twinx axes
    panels, twins = fig.axes[:3], fig.axes[3:]
    for ax in panels:
        assert ax.get_title() and ax.get_xlabel() == "epoch" and "nats" in ax.get_ylabel()
        assert [ln.get_label() for ln in ax.lines] == ["train", "val", "test"]
    for ax, twin in zip(panels, twins, strict=True):
        assert twin.get_shared_x_axes().joined(ax, twin)
        assert "beta" in twin.get_ylabel()
        np.testing.assert_allclose(twin.lines[0].get_ydata(), [0.5, 1.0, 1.0, 1.0])
    assert [t.get_text() for t in fig.legends[0].get_texts()][:3] == ["train", "val", "test"]
    assert len(fig.legends[0].get_texts()) == 4
    assert fig.get_suptitle()

    no_val = plots.training_curves(make_metrics(val=False))
    assert [ln.get_label() for ln in no_val.axes[0].lines] == ["train", "test"]
    with pytest.raises(ConfigError, match="no metrics"):
        plots.training_curves([])


def test_latent_scatter_legend_labels_and_prior_circles(vae, split):
    fig = plots.latent_scatter(vae, split)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [str(d) for d in range(10)]
    assert ax.get_legend().get_title().get_text() == "digit"
    assert ax.get_xlabel() == "$z_{1}$" and ax.get_ylabel() == "$z_{2}$"
    assert ax.get_title()
    assert sorted(p.get_radius() for p in ax.patches) == [1, 2, 3]
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(split)
    few = plots.latent_scatter(vae, split, max_points=15).axes[0]
    assert sum(len(c.get_offsets()) for c in few.collections) == 15


def test_latent_scatter_picks_the_most_active_dims(split):
    model = tiny("vae", latent_dim=4, seed=3)
    with torch.no_grad():
        mu, _ = model.encode(split.images.unsqueeze(1).float() / 255)
    top = np.argsort(-mu.var(0).numpy())[:2]
    ax = plots.latent_scatter(model, split).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == (f"$z_{{{top[0] + 1}}}$", f"$z_{{{top[1] + 1}}}$")
    assert "most active" in ax.get_title()
    ax = plots.latent_scatter(model, split, dims=(3, 0)).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("$z_{4}$", "$z_{1}$")
    with pytest.raises(ConfigError, match="dims"):
        plots.latent_scatter(model, split, dims=(1, 4))


def test_traversal_grid_covers_the_prior_in_one_call(vae, monkeypatch):
    spy = DecodeSpy(vae, monkeypatch)
    n, span = 6, 0.98
    fig = plots.traversal_grid(vae, n=n, span=span)
    assert len(spy.calls) == 1
    (ax,) = fig.axes
    assert image_of(ax).shape == (n * 28, n * 28)
    assert ax.get_xlabel() == "$z_{1}$" and ax.get_ylabel() == "$z_{2}$" and ax.get_title()
    q = torch.linspace((1 - span) / 2, (1 + span) / 2, n, dtype=torch.float64)
    values = torch.distributions.Normal(0.0, 1.0).icdf(q).numpy()
    z = spy.calls[0]["z"].reshape(n, n, 2)
    np.testing.assert_allclose(z[0, :, 0], values, rtol=1e-5)  # z_1 grows to the right
    np.testing.assert_allclose(z[:, 0, 1], values[::-1], rtol=1e-5)  # z_2 grows upwards
    assert tick_texts(ax.get_xticklabels())[0] == f"{values[0]:.2f}"
    assert tick_texts(ax.get_yticklabels())[0] == f"{values[-1]:.2f}"
    with pytest.raises(ConfigError, match="takes no class"):
        plots.traversal_grid(vae, y=3)


def test_traversal_grid_cvae_needs_y_and_other_dims_are_zero(cvae, monkeypatch):
    with pytest.raises(ConfigError, match="needs the class y"):
        plots.traversal_grid(cvae)
    spy = DecodeSpy(cvae, monkeypatch)
    ax = plots.traversal_grid(cvae, n=3, y=7).axes[0]
    assert "y = 7" in ax.get_title()
    assert len(spy.calls) == 1 and (spy.calls[0]["y"] == 7).all()

    model = tiny("vae", latent_dim=4)
    spy = DecodeSpy(model, monkeypatch)
    ax = plots.traversal_grid(model, n=3, dims=(1, 3)).axes[0]
    z = spy.calls[0]["z"]
    assert (z[:, [0, 2]] == 0).all() and (z[:, [1, 3]] != 0).any()
    assert ax.get_xlabel() == "$z_{2}$" and "other 2 dimensions at 0" in ax.get_title()


@pytest.mark.parametrize("mode", ["linear", "spherical"])
def test_interpolations_rows_are_pairs_of_different_digits(vae, split, monkeypatch, mode):
    spy = DecodeSpy(vae, monkeypatch)
    pairs, steps = 3, 5
    fig = plots.interpolations(vae, split, pairs=pairs, steps=steps, mode=mode)
    assert len(spy.calls) == 1 and spy.calls[0]["z"].shape == (pairs * steps, 2)
    (ax,) = fig.axes
    assert image_of(ax).shape == (grid_size(pairs), grid_size(steps + 2))
    rows = tick_texts(ax.get_yticklabels())
    assert len(rows) == pairs and all(a != b for a, b in (r.split(" → ") for r in rows))
    assert (mode == "spherical") == ("slerp" in ax.get_title())
    with pytest.raises(ConfigError, match="mode"):
        plots.interpolations(vae, split, mode="cubic")


def test_interpolations_of_a_cvae_switch_label_halfway(cvae, split, monkeypatch):
    spy = DecodeSpy(cvae, monkeypatch)
    ax = plots.interpolations(cvae, split, pairs=2, steps=4, seed=1).axes[0]
    y = spy.calls[0]["y"].reshape(2, 4)
    firsts = [int(r.split(" → ")[0]) for r in tick_texts(ax.get_yticklabels())]
    lasts = [int(r.split(" → ")[1]) for r in tick_texts(ax.get_yticklabels())]
    assert (y[:, :2] == np.array(firsts)[:, None]).all()
    assert (y[:, 2:] == np.array(lasts)[:, None]).all()


def test_cvae_label_interpolation_one_row_per_label(cvae, vae, split, monkeypatch):
    spy = DecodeSpy(cvae, monkeypatch)
    fig = plots.cvae_label_interpolation(cvae, split, labels=(1, 7, 3), steps=4)
    assert len(spy.calls) == 1
    z, y = spy.calls[0]["z"], spy.calls[0]["y"]
    assert list(y) == [1] * 4 + [7] * 4 + [3] * 4
    np.testing.assert_array_equal(z[:4], z[4:8])  # the same path under every label
    ax_a, ax, ax_b = fig.axes
    assert image_of(ax).shape == (grid_size(3), grid_size(4))
    assert tick_texts(ax.get_yticklabels()) == ["y = 1", "y = 7", "y = 3"]
    assert ax.get_title() and ax_a.get_title().startswith("$x_a$")
    with pytest.raises(ConfigError, match="needs a CVAE.*vae"):
        plots.cvae_label_interpolation(vae, split)


def test_style_transfer_decodes_each_style_under_every_class(cvae, split, monkeypatch):
    spy = DecodeSpy(cvae, monkeypatch)
    fig = plots.style_transfer(cvae, split, n_styles=3)
    assert len(spy.calls) == 1
    z, y = spy.calls[0]["z"].reshape(3, 10, 2), spy.calls[0]["y"].reshape(3, 10)
    assert (y == np.arange(10)).all() and (z == z[:, :1]).all()
    ax_in, ax = fig.axes
    assert image_of(ax_in).shape == (grid_size(3), 28)
    assert image_of(ax).shape == (grid_size(3), grid_size(10))
    assert tick_texts(ax.get_xticklabels()) == [str(c) for c in range(10)]
    assert ax.get_title() and ax.get_xlabel()


def test_samples_per_class_rows_are_classes(cvae, vae, monkeypatch):
    spy = DecodeSpy(cvae, monkeypatch)
    fig = plots.samples_per_class(cvae, per_class=4)
    assert len(spy.calls) == 1
    assert list(spy.calls[0]["y"]) == [c for c in range(10) for _ in range(4)]
    (ax,) = fig.axes
    assert image_of(ax).shape == (grid_size(10), grid_size(4))
    assert tick_texts(ax.get_yticklabels()) == [str(c) for c in range(10)]
    assert ax.get_title() and ax.get_ylabel() == "class y"
    with pytest.raises(ConfigError, match="needs a CVAE"):
        plots.samples_per_class(vae)


def test_reconstructions_inputs_above_decoded_posterior_means(vae, split, monkeypatch):
    spy = DecodeSpy(vae, monkeypatch)
    fig = plots.reconstructions(vae, split, n=20)
    assert len(spy.calls) == 1 and spy.calls[0]["z"].shape == (20, 2)
    with torch.no_grad():
        mu, _ = vae.encode(split.images.unsqueeze(1).float() / 255)
    assert any(np.allclose(spy.calls[0]["z"][0], m, atol=1e-5) for m in mu.numpy())
    ax_in, ax_out = fig.axes
    assert image_of(ax_in).shape == image_of(ax_out).shape == (grid_size(2), grid_size(16))
    assert "posterior mean" in ax_out.get_title() and ax_in.get_title()


def test_prior_samples_grid_seeded_and_cvae_classes(vae, cvae, monkeypatch):
    spy = DecodeSpy(vae, monkeypatch)
    a = image_of(plots.prior_samples(vae, n=9, seed=5).axes[0])
    b = image_of(plots.prior_samples(vae, n=9, seed=5).axes[0])
    assert len(spy.calls) == 2 and a.shape == (grid_size(3), grid_size(3))
    np.testing.assert_array_equal(a, b)
    spy = DecodeSpy(cvae, monkeypatch)
    ax = plots.prior_samples(cvae, n=20).axes[0]
    assert len(spy.calls) == 1 and list(spy.calls[0]["y"]) == [i % 10 for i in range(20)]
    assert image_of(ax).shape == (grid_size(2), grid_size(10)) and "column" in ax.get_title()
    assert tick_texts(ax.get_xticklabels()) == [str(c) for c in range(10)]
    plots.prior_samples(cvae, n=4, y=2)
    assert (spy.calls[-1]["y"] == 2).all()
    with pytest.raises(ConfigError, match="class y must be"):
        plots.prior_samples(cvae, y=10)


# --------------------------------------------------------------------------------------------
# Saving, registry, draw_all
# --------------------------------------------------------------------------------------------
def small_figure() -> Figure:
    fig = Figure(figsize=(1.0, 1.0))
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def test_save_figure_writes_each_format_atomically(tmp_path):
    fig = small_figure()
    paths = plots.save_figure(fig, tmp_path / "out" / "samples", ("png", "pdf"))
    assert paths == [tmp_path / "out" / "samples.png", tmp_path / "out" / "samples.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    with Image.open(paths[0]) as im:
        assert im.info["dpi"][0] == pytest.approx(300, abs=0.5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["samples.pdf", "samples.png"]

    # Rendering happens before any file is touched: a failure leaves the old files whole.
    fig = small_figure()
    old = paths[0].read_bytes()

    def broken(buf: io.BytesIO, format: str, **kw: Any) -> None:
        if format == "pdf":
            raise RuntimeError("disk full")
        buf.write(b"new")

    fig.savefig = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        plots.save_figure(fig, tmp_path / "out" / "samples", ("png", "pdf"))
    assert paths[0].read_bytes() == old
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["samples.pdf", "samples.png"]
    with pytest.raises(ConfigError, match="format 'gif'"):
        plots.save_figure(fig, tmp_path / "x", ("gif",))


def fake_run(model, path: Path) -> Run:
    return Run(path, model, {"config": {}}, make_metrics(3), {})


def test_registry_and_select_figures(vae, cvae, split, tmp_path):
    common = ["curves", "latent", "traversal", "interpolation-linear", "interpolation-spherical",
              "reconstructions", "samples"]
    only_cvae = ["cvae-interpolation", "style-transfer", "samples-per-class"]
    only_2d = ["true-posterior"]
    assert list(plots.FIGURES) == common + only_cvae + only_2d
    for name, spec in plots.FIGURES.items():
        want = "cvae" if name in only_cvae else "latent2" if name in only_2d else "all"
        assert spec.caption and spec.applies_to == want
    v, c = fake_run(vae, tmp_path / "v"), fake_run(cvae, tmp_path / "c")
    assert plots.select_figures(v, "all") == common + only_2d
    assert plots.select_figures(c, ["all"]) == common + only_cvae + only_2d
    wide = fake_run(tiny("vae", latent_dim=3), tmp_path / "w")
    assert "true-posterior" not in plots.select_figures(wide, "all")
    with pytest.raises(ConfigError, match=r"needs a 2-D latent.*has a 3-D latent"):
        plots.select_figures(wide, ["true-posterior"])
    assert plots.select_figures(v, ["samples", "latent", "samples"]) == ["samples", "latent"]
    with pytest.raises(ConfigError, match="unknown figure 'nope'"):
        plots.select_figures(v, ["nope"])
    with pytest.raises(ConfigError, match=r"needs a CVAE.* is a vae"):
        plots.select_figures(v, ["style-transfer"])


def test_draw_all_draws_every_applicable_figure(cvae, split, tmp_path, monkeypatch):
    saved: dict[str, Figure] = {}

    def fake_save(fig, stem, formats=("png", "pdf")):  # drawing is tested, not rendering
        saved[Path(stem).name] = fig
        return [Path(f"{stem}.{f}") for f in formats]

    monkeypatch.setattr(plots, "save_figure", fake_save)
    ds = Dataset("synthetic", train=split, val=split, test=split)
    out = plots.draw_all(fake_run(cvae, tmp_path), ds, tmp_path / "figs", ("svg",))
    assert list(out) == list(plots.FIGURES)
    assert out["latent"] == [tmp_path / "figs" / "latent.svg"]
    for fig in saved.values():
        assert isinstance(fig, Figure)
        assert fig.get_suptitle() or all(a.get_title() for a in fig.axes if a.images)
    assert "y = 0" in saved["traversal"].axes[0].get_title()
    with pytest.raises(ConfigError, match="format"):
        plots.draw_all(fake_run(cvae, tmp_path), ds, tmp_path / "figs", ("bmp",))


# --------------------------------------------------------------------------------------------
# vaelab plot
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    from vaelab.config import resolve_config
    from vaelab.training import train

    root = tmp_path_factory.mktemp("plotrun")
    data = write_synthetic(root / "idx", uniform_noise, 160, 40, seed=1)
    cfg = resolve_config("smoke", dataset=f"idx:{data}", device="cpu")
    train(cfg, root / "run", progress=False)
    return root / "run"


def test_cli_plot_writes_figures_and_prints_paths(trained_run, capsys):
    from vaelab.cli import main

    assert main(["plot", str(trained_run), "--figure", "samples", "--format", "png"]) == 0
    path = trained_run / "figures" / "samples.png"
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out.split() == [str(path)]


def test_cli_plot_bad_figure_is_one_line_exit_2(trained_run, tmp_path, capsys):
    from vaelab.cli import main

    assert main(["plot", str(trained_run), "--figure", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown figure 'nope'" in err
    assert main(["plot", str(trained_run), "--figure", "style-transfer",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CVAE" in err and "is a vae" in err
    assert not any(tmp_path.iterdir())


def test_the_true_posterior_figure_shows_p_and_q_for_the_chosen_digits(vae, split) -> None:
    from vaelab.evaluate import true_posteriors

    pics = true_posteriors(vae, split, candidates=40, per_row=3, intervals=16)
    assert len(pics["largest"]) == 3 and len(pics["smallest"]) == 3
    for row in pics.values():  # one digit per class in a row
        assert len({p.label for p in row}) == len(row)
    assert min(p.gap for p in pics["largest"]) >= max(p.gap for p in pics["smallest"]) - 1e-6
    for p in pics["largest"] + pics["smallest"]:
        cell = float((p.z1[1] - p.z1[0]) * (p.z2[1] - p.z2[0]))
        assert float(p.density.sum()) * cell == pytest.approx(1.0, abs=0.05)  # a density
        assert p.gap >= -0.05  # KL(q || p(z|x)) >= 0, up to the quadrature's error
    fig = plots.true_posterior(pics)
    assert len([a for a in fig.axes if a.get_title()]) == 6
    assert all("KL(q || p)" in a.get_title() for a in fig.axes if a.get_title())


def test_the_true_posterior_figure_takes_an_evaluation_s_exact_values(vae, split, monkeypatch
                                                                      ) -> None:
    """Given the split's per-image exact log p(x) (as the report passes its evaluation's), the
    figure runs no quadrature of its own, and shows the digits it would have chosen itself."""
    import vaelab.evaluate as ev

    part = split.subset(40)
    own = ev.true_posteriors(vae, part, candidates=40, per_row=3, intervals=16)
    given = ev.exact_log_px_per_image(vae, part, tolerance=0.5)

    def refuse(*a, **k):
        raise AssertionError("a second quadrature")

    monkeypatch.setattr(ev, "exact_log_px_per_image", refuse)
    took = ev.true_posteriors(vae, part, candidates=40, per_row=3, intervals=16, exact=given)
    for row in ("largest", "smallest"):
        assert [p.index for p in took[row]] == [p.index for p in own[row]]
        for a, b in zip(took[row], own[row], strict=True):
            assert torch.equal(a.density, b.density) and a.log_px == b.log_px
    with pytest.raises(AssertionError, match="second quadrature"):  # too few: computed again
        ev.true_posteriors(vae, part, candidates=40, exact=given.subset(39))
