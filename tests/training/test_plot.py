"""loss.png: the held-out loss is drawn only where it was measured."""

from __future__ import annotations

import pytest

from eetq_lora.training import plot

pytest.importorskip("matplotlib")


def drawn_figure(monkeypatch, tmp_path, held_out):
    """The held-out line of the figure save_loss_plot writes (its x and y data and line style)."""
    captured = {}

    def keep(path, write):
        write(tmp_path / "plot.png")
        captured["path"] = path

    import matplotlib.pyplot as plt

    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure: captured.setdefault("figure", figure))
    monkeypatch.setattr(plot, "write_with_atomic", keep)
    plot.save_loss_plot(tmp_path / "loss.png", [2.0, 1.8, 1.5, 1.4, 1.2, 1.1], held_out, "t")
    figure = captured["figure"]
    lines = [line for line in figure.axes[0].get_lines() if line.get_marker() == "o"]
    real_close(figure)
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert len(lines) == 1
    line = lines[0]
    return list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle()


def test_measured_points_are_joined_only_through_measurements(monkeypatch, tmp_path):
    xs, ys, style = drawn_figure(monkeypatch, tmp_path, [(0, 2.1), (2, 1.7), (4, 1.3), (6, 1.2)])
    assert xs == [0, 2, 4, 6] and ys == [2.1, 1.7, 1.3, 1.2] and style == "-"


def test_before_and_after_alone_are_markers_without_a_line(monkeypatch, tmp_path):
    xs, ys, style = drawn_figure(monkeypatch, tmp_path, [(0, 2.1), (6, 1.2)])
    assert xs == [0, 6] and ys == [2.1, 1.2] and style == "None"


def test_moving_average_is_a_trailing_mean():
    assert plot.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
