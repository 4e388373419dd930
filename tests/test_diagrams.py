"""The book's diagrams (:mod:`moe_ref.book.diagrams`): page-size and legibility rules, and the numbers they show."""

import math

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from moe_ref.book import diagrams  # noqa: E402
from moe_ref.book.diagrams import (capacity_drops, data_path, gemm_launch_row_tiles, gemm_row_tiles,  # noqa: E402
                                   gemm_tile_schedule, moe_block)

CASES = {
    "moe_block": lambda: moe_block(),
    "moe_block_shared": lambda: moe_block(num_experts=8, k=2, shared=True),
    "moe_block_wide": lambda: moe_block(num_experts=16, k=4),
    "moe_block_k1": lambda: moe_block(num_experts=1, k=1),
    "data_path": lambda: data_path(),
    "data_path_k1": lambda: data_path(T=8, d=6, E=4, k=1, d_ff=16),
    "capacity_drops": lambda: capacity_drops(),
    "capacity_drops_cf": lambda: capacity_drops((9, 0, 1, 2, 3, 3), capacity=None, capacity_factor=1.25),
    "gemm_tile_schedule": lambda: gemm_tile_schedule(),
    "gemm_tile_schedule_many": lambda: gemm_tile_schedule((300, 10, 0, 0, 190), block_m=64, block_n=128, n=4096),
    "gemm_tile_schedule_rows_only": lambda: gemm_tile_schedule((5,), block_m=16, output_grid=False),
    "expert_parallel": lambda: diagrams.expert_parallel(),
    "expert_parallel_w3": lambda: diagrams.expert_parallel(world_size=3, num_experts=6, k=2, tokens_per_rank=2),
    "expert_parallel_k1": lambda: diagrams.expert_parallel(world_size=2, num_experts=8, k=1, tokens_per_rank=5),
}


@pytest.fixture(params=sorted(CASES))
def fig(request):
    figure = CASES[request.param]()
    yield figure
    plt.close(figure)


def _texts(figure):
    return [t for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _all_text(figure) -> str:
    return "\n".join(t.get_text() for t in _texts(figure))


def test_page_size_and_panels(fig):
    assert isinstance(fig, Figure)
    width, height = fig.get_size_inches()
    assert width <= 6.4 + 1e-9
    assert 0 < height <= 8.5
    rows = {}
    for ax in fig.axes:
        y0 = round(ax.get_position().y0, 3)
        rows[y0] = rows.get(y0, 0) + 1
        assert not ax.axison  # no ticks, no frame
    assert rows and max(rows.values()) <= 2


def test_text_size(fig):
    texts = _texts(fig)
    assert texts
    small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 10]
    assert not small


def test_text_inside_figure_and_not_overlapping(fig):
    """Every text fits on the figure, and no two texts overlap (legibility, checked on the rendered layout)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    page = fig.bbox
    boxes = []
    for t in _texts(fig):
        bb = t.get_window_extent(renderer)
        assert bb.x0 >= page.x0 - 1 and bb.x1 <= page.x1 + 1 and bb.y0 >= page.y0 - 1 and bb.y1 <= page.y1 + 1, \
            f"text {t.get_text()!r} is cut off: {bb} outside {page}"
        boxes.append((t.get_text(), bb.expanded(0.97, 0.9)))  # small tolerance for glyph padding
    for i, (a, ba) in enumerate(boxes):
        for b, bb in boxes[i + 1:]:
            assert not ba.overlaps(bb), f"texts {a!r} and {b!r} overlap"


def test_capacity_dropped_count():
    figure = capacity_drops(tokens_per_expert=(5, 2, 3, 2), capacity=3)
    assert "C = 3, dropped = 2" in _all_text(figure)  # 5 - 3 = 2 over capacity, the others fit
    plt.close(figure)
    figure = capacity_drops(tokens_per_expert=(4, 4, 0, 0), capacity=1)
    assert "C = 1, dropped = 6" in _all_text(figure)
    plt.close(figure)


def test_capacity_from_factor():
    # C = ceil(1.25 * 12 / 4) = ceil(3.75) = 4: only expert 0's fifth assignment is dropped
    figure = capacity_drops(tokens_per_expert=(5, 2, 3, 2), capacity=None, capacity_factor=1.25)
    assert "C = 4, dropped = 1" in _all_text(figure)
    plt.close(figure)
    with pytest.raises(ValueError):
        capacity_drops((5, 2, 3, 2), capacity=3, capacity_factor=1.25)


def test_gemm_tiles_hand_computed():
    tiles = gemm_row_tiles((70, 20, 0, 45), block_m=32)
    # ceil(70/32) + ceil(20/32) + 0 + ceil(45/32) = 3 + 1 + 0 + 2
    assert len(tiles) == 6
    assert [t.tile_m for t in tiles] == list(range(6))
    assert [t.expert for t in tiles] == [0, 0, 0, 1, 3, 3]
    assert [t.row_start for t in tiles] == [0, 32, 64, 70, 90, 122]
    assert [t.rows for t in tiles] == [32, 32, 6, 20, 32, 13]  # last tiles of a group partially masked
    assert gemm_launch_row_tiles((70, 20, 0, 45), 32) == math.ceil(135 / 32) + 4 == 9
    assert gemm_row_tiles((0, 0, 1), 16) == [diagrams.GemmTile(0, 2, 0, 1)]


def test_gemm_figure_numbers_tiles_and_programs():
    figure = gemm_tile_schedule((70, 20, 0, 45), block_m=32, block_n=64, n=128)
    texts = [t.get_text() for t in _texts(figure)]
    assert [f"tile {i}" for i in range(6)] == [s for s in texts if s.startswith("tile ")]
    assert "→ 6 row tiles" in _all_text(figure)
    # launch grid: 9 row tiles x 2 column tiles, program ids 0..17
    assert {str(p) for p in range(18)} <= set(texts)
    assert "18" not in texts
    assert "expert 2: 0 rows, no tile" in texts
    plt.close(figure)


def test_expert_colors_shared():
    assert len(diagrams.EXPERT_COLORS) >= 8
    assert len(set(diagrams.EXPERT_COLORS)) == len(diagrams.EXPERT_COLORS)
    assert diagrams.expert_color(9) == diagrams.EXPERT_COLORS[1]


def test_save_all(tmp_path):
    paths = diagrams.save_all(tmp_path)
    assert {p.name for p in paths} >= {"moe_block.svg", "data_path.svg", "capacity_drops.svg",
                                       "gemm_tile_schedule.svg"}
    for p in paths:
        assert p.read_text().lstrip().startswith("<?xml")
    plt.close("all")


def test_expert_cuts_active_over_total():
    import matplotlib.pyplot as plt

    fig = diagrams.expert_cuts((("a", 8, 128, 2, 0), ("b", 31, 32, 7, 1)))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "256 / 1024" in texts and texts.count("256 / 1024") == 2
    plt.close(fig)
    for bad in [(), (("a", 4, 32, 5, 0),), (("a", 0, 32, 1, 0),), (("a", 4, 32),)]:
        with pytest.raises(ValueError, match="row"):
            diagrams.expert_cuts(bad)


def test_expert_parallel_plan_hand_computed():
    # W = 2, E = 4 (rank 0: experts 0, 1; rank 1: experts 2, 3), tokens 0, 1 on rank 0 and 2, 3 on rank 1
    plan = diagrams.expert_parallel_plan([[3, 0], [1, 2], [2, 3], [0, 2]], world_size=2, num_experts=4)
    assert plan["x_sorted"] == [[(0, 0), (1, 1), (1, 2), (0, 3)], [(3, 0), (2, 2), (3, 2), (2, 3)]]
    assert plan["send_counts"] == [[[1, 1], [1, 1]], [[1, 0], [2, 1]]]
    # source-major: rank 0's own rows first, then rank 1's
    assert plan["x_recv"] == [[(0, 0, 0), (0, 1, 1), (1, 3, 0)],
                              [(0, 1, 2), (0, 0, 3), (1, 2, 2), (1, 3, 2), (1, 2, 3)]]
    assert plan["expert_major"] == [[(0, 0, 0), (1, 3, 0), (0, 1, 1)],
                                    [(0, 1, 2), (1, 2, 2), (1, 3, 2), (0, 0, 3), (1, 2, 3)]]
    with pytest.raises(ValueError):
        diagrams.expert_parallel_plan([[0, 1], [2, 3], [1, 0]], world_size=2, num_experts=4)  # 3 tokens, W = 2
    with pytest.raises(ValueError):
        diagrams.expert_parallel_plan([[0, 4]], world_size=1, num_experts=4)  # expert 4 of 4


def test_expert_parallel_every_row_travels_and_returns():
    """Each token appears once in x and y and k times in x_sorted, x_recv and y_sorted: no row is lost."""
    for W, E, k, T in [(2, 4, 2, 3), (3, 6, 2, 2), (2, 8, 1, 5), (3, 3, 3, 2)]:
        figure = diagrams.expert_parallel(world_size=W, num_experts=E, k=k, tokens_per_rank=T)
        texts = [t.get_text() for t in _texts(figure)]
        for t in range(W * T):
            assert texts.count(f"t{t}") == 3 * k + 2, (W, E, k, T, t)
        assert f"Expert parallelism: W = {W} ranks, E = {E} experts, k = {k}" in texts
        plt.close(figure)
    for bad in [dict(world_size=4), dict(num_experts=5), dict(k=5), dict(tokens_per_rank=6)]:
        with pytest.raises(ValueError):
            diagrams.expert_parallel(**bad)
