"""Checks on rendered matplotlib figures shared by the view and sweep tests: every text inside, none overlapping."""

import itertools

from matplotlib.backends.backend_agg import FigureCanvasAgg


def all_texts(figure):
    """Every drawn, non-empty text of the figure (after a draw): titles, labels, tick labels in the view, cells,
    legends."""
    texts = [figure._suptitle, figure._supxlabel]
    for axis in figure.axes:
        texts += [axis.title, axis.xaxis.label, axis.yaxis.label, *axis.texts]
        for ticks, labels, limits in (
            (axis.get_xticks(), axis.get_xticklabels(), axis.get_xlim()),
            (axis.get_yticks(), axis.get_yticklabels(), axis.get_ylim()),
        ):
            low, high = sorted(limits)
            texts += [label for tick, label in zip(ticks, labels, strict=True) if low - 1e-9 <= tick <= high + 1e-9]
        if axis.get_legend() is not None:
            texts += axis.get_legend().get_texts()
    return [t for t in texts if t is not None and t.get_visible() and t.get_text().strip()]


def assert_texts_inside_and_apart(figure, min_texts: int = 5) -> None:
    """Render ``figure`` and assert that every text lies inside it (1 px of rounding) and no two texts overlap."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in all_texts(figure)]
    assert len(boxes) > min_texts
    for text, box in boxes:
        assert figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1 + 1, text
        assert figure.bbox.y0 <= box.y0 and box.y1 <= figure.bbox.y1 + 1, text
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), (a, b)
