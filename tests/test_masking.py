import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov2_patho.data.collate import collate_multicrop, draw_masks
from dinov2_patho.data.masking import MaskingGenerator
from dinov2_patho.errors import UserError


@settings(max_examples=40, deadline=None)
@given(grid=st.integers(4, 16), frac=st.floats(0.0, 0.6), seed=st.integers(0, 1000))
def test_mask_never_exceeds_request_and_is_reproducible(grid, frac, seed):
    gen = MaskingGenerator(grid, max_num_patches=0.5 * grid * grid)
    n = int(frac * grid * grid)
    mask = gen(n, generator=torch.Generator().manual_seed(seed))
    assert mask.shape == (grid, grid) and mask.dtype == torch.bool
    assert int(mask.sum()) <= n
    assert torch.equal(mask, gen(n, generator=torch.Generator().manual_seed(seed)))


def test_mask_reaches_the_requested_count_and_is_blockwise():
    gen = MaskingGenerator(16, max_num_patches=128)
    torch.manual_seed(0)
    counts = [int(gen(n).sum()) for n in (10, 50, 100)]
    assert counts == [10, 50, 100]
    mask = gen(64)
    # blocks, not scattered patches: most masked patches have a masked 4-neighbour
    padded = torch.nn.functional.pad(mask, (1, 1, 1, 1))
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert (neighbours & mask).sum() >= 0.9 * mask.sum()
    assert int(gen(0).sum()) == 0


def test_masking_rejects_bad_grid():
    with pytest.raises(UserError, match="empty"):
        MaskingGenerator((0, 4))


def test_draw_masks_stratifies_ratios():
    gen = MaskingGenerator(10, max_num_patches=50)
    masks = draw_masks(20, 100, (0.1, 0.5), 0.5, gen, generator=torch.Generator().manual_seed(1))
    counts = masks.sum(dim=1)
    assert masks.shape == (20, 100)
    assert int((counts > 0).sum()) == 10  # int(20 * 0.5) images masked
    masked = counts[counts > 0].sort().values
    assert masked.max() <= 50 and masked.min() >= 5  # within the ratio range (at most, never above)
    assert masked[-1] - masked[0] >= 20  # spread across the range, not all alike


def _sample(row_id, n_local=3, g=8, l=4):
    crops = {"global_crops": [torch.full((3, g, g), float(row_id * 10 + c)) for c in range(2)],
             "local_crops": [torch.full((3, l, l), float(row_id * 10 + 2 + c)) for c in range(n_local)]}
    return crops, row_id


def test_collate_layout_indices_and_weights():
    gen = MaskingGenerator(4, max_num_patches=8)
    samples = [_sample(r) for r in (7, 3, 5)]
    batch = collate_multicrop(samples, mask_ratio_min_max=(0.2, 0.5), mask_probability=1.0,
                              mask_generator=gen, generator=torch.Generator().manual_seed(0))
    assert batch["row_ids"].tolist() == [7, 3, 5]
    assert batch["global_crops"].shape == (6, 3, 8, 8) and batch["local_crops"].shape == (9, 3, 4, 4)
    # crop-major: crop c of sample i at c * B + i
    assert batch["global_crops"][:, 0, 0, 0].tolist() == [70, 30, 50, 71, 31, 51]
    assert batch["local_crops"][:, 0, 0, 0].tolist() == [72, 32, 52, 73, 33, 53, 74, 34, 54]
    masks = batch["masks"]
    assert masks.shape == (6, 16)
    assert torch.equal(batch["mask_indices"], masks.flatten().nonzero().flatten())
    assert batch["n_masked_patches"] == int(masks.sum()) > 0
    # weights: 1 / (masked patches of the crop), so they sum to 1 per masked crop
    image_of = batch["mask_indices"] // 16
    per_image = torch.zeros(6).index_add_(0, image_of, batch["masks_weight"])
    assert torch.allclose(per_image, (masks.sum(1) > 0).float())


def test_collate_without_local_crops_or_masks():
    gen = MaskingGenerator(4)
    batch = collate_multicrop([_sample(1, n_local=0)], mask_ratio_min_max=(0.1, 0.5), mask_probability=0.0,
                              mask_generator=gen)
    assert batch["local_crops"].shape == (0, 3, 8, 8) and batch["n_local_crops"] == 0
    assert batch["n_masked_patches"] == 0 and batch["masks_weight"].numel() == 0

