"""Figure titles of the reproduction report stay inside the figure (fig1.png's was clipped)."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from eigensam.lab.experiments.report import figure_title
from eigensam.lab.experiments.runs import CPU_NOTE


def test_a_long_scale_note_is_wrapped_inside_the_figure():
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    fig.subplots(2, 2)
    title = f"Figure 1 at {CPU_NOTE} " * 2
    figure_title(fig, title, "(mean, 95% band over seeds)")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig._suptitle.get_window_extent(canvas.get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width
    assert fig._suptitle.get_text().count("\n") >= 2  # wrapped, not one long line
