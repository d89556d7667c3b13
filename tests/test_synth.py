"""kts.synth: images re-synthesised from tissue label maps (SynthSeg's domain randomisation, issue 16)."""
import dataclasses

import numpy as np
import pytest

from kts import config, phantom, synth, train

FIXED = synth.SynthConfig(p_synthetic=1.0, rotation_deg=0.0, scale=(1.0, 1.0), shift=0.0, elastic_px=0.0,
                          texture_sd=(0.0, 0.0), bias_sd=0.0, blur_px=(0.0, 0.0), downsample=(1.0, 1.0),
                          gamma_sd=0.0, noise=(0.0, 0.0), p_mixing_curve=0.0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from kts import workflow

    profile = dataclasses.replace(config.get_profile("quick"), n_cases=4)
    dataset, _ = workflow.prepare_dataset(profile, seed=2, data_dir=tmp_path_factory.mktemp("data"))
    return dataset


def _labels():
    labels = np.zeros((64, 64), np.int32)
    labels[10:40, 10:30] = 3
    labels[20:30, 35:60] = 5
    return labels, (labels == 5).astype(np.float32)[..., None]


def test_without_randomness_each_label_is_one_grey_level_and_the_mask_is_untouched():
    import tensorflow as tf

    labels, mask = _labels()
    image, out_mask = synth.synthesise(tf.constant(labels), tf.constant(mask), tf.constant([1, 2], tf.int64), 6,
                                       FIXED)
    image, out_mask = image.numpy()[..., 0], out_mask.numpy()
    np.testing.assert_array_equal(out_mask, mask)
    for label in (0, 3, 5):
        assert np.ptp(image[labels == label]) < 1e-4, label
    assert len({round(float(image[labels == k].mean()), 4) for k in (0, 3, 5)}) == 3
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_the_draw_depends_only_on_the_seed_and_moves_mask_and_labels_together():
    import tensorflow as tf

    labels, mask = _labels()
    draw = [synth.synthesise(tf.constant(labels), tf.constant(mask), tf.constant(s, tf.int64), 6)
            for s in ([0, 7], [0, 7], [0, 8])]
    np.testing.assert_array_equal(draw[0][0].numpy(), draw[1][0].numpy())
    assert not np.array_equal(draw[0][0].numpy(), draw[2][0].numpy())
    for image, out_mask in draw:
        assert image.shape == (64, 64, 1) and set(np.unique(out_mask.numpy())) <= {0.0, 1.0}
        assert 0.0 <= float(tf.reduce_min(image)) and float(tf.reduce_max(image)) <= 1.0
    # the deformed kidney keeps roughly its area (scale 0.75-1.3 changes it by at most ~1.8x)
    area = mask.sum()
    assert all(0.4 * area < m.numpy().sum() < 2.0 * area for _, m in draw)


def test_bad_synth_config_is_refused():
    with pytest.raises(ValueError, match="p_synthetic"):
        synth.SynthConfig(p_synthetic=1.5)
    with pytest.raises(ValueError, match="scale"):
        synth.SynthConfig(scale=(1.2, 0.9))
    with pytest.raises(ValueError, match="p_mixing_curve"):
        synth.SynthConfig(p_mixing_curve=-0.1)


def test_the_mixing_curve_remaps_grey_levels_and_keeps_labels_flat():
    import tensorflow as tf

    labels, mask = _labels()
    seed = tf.constant([1, 2], tf.int64)
    plain = synth.synthesise(tf.constant(labels), tf.constant(mask), seed, 6, FIXED)[0].numpy()[..., 0]
    curved = synth.synthesise(tf.constant(labels), tf.constant(mask), seed, 6,
                              dataclasses.replace(FIXED, p_mixing_curve=1.0))[0].numpy()[..., 0]
    assert not np.allclose(plain, curved)
    for label in (0, 3, 5):  # without blur a label is still one grey level: the curve maps levels to levels
        assert np.ptp(curved[labels == label]) < 1e-4, label
    assert 0.0 <= curved.min() and curved.max() <= 1.0


def test_phantom_tissue_maps_align_with_the_dataset(small):
    tissue = phantom.tissue_label_maps(small)
    assert tissue.shape == small.kidney_masks.shape and tissue.max() < len(phantom.TISSUE_NAMES)
    np.testing.assert_array_equal(np.isin(tissue, phantom.KIDNEY_TISSUES), small.kidney_masks > 0)
    subset = small.subset(small.case_ids[:2])
    np.testing.assert_array_equal(phantom.tissue_label_maps(subset), tissue[: len(subset)])


def test_tissue_maps_need_the_phantom(small, tmp_path):
    alien = dataclasses.replace(small, source_root=str(tmp_path))
    with pytest.raises(ValueError, match="no phantom.json"):
        phantom.tissue_label_maps(alien)


def test_synth_pipeline_is_seeded_and_p0_is_the_paper_pipeline(small):
    tissue = phantom.tissue_label_maps(small)
    x, y = small.images, small.kidney_masks

    def batches(**kwargs):
        ds = train.make_dataset(x, y, batch_size=4, seed=3, epochs=1, **kwargs)
        return [b[0].numpy() for b in ds]

    plain = batches()
    never = batches(intensity="synth", tissue_labels=tissue, synth_config=dataclasses.replace(synth.DEFAULT,
                                                                                           p_synthetic=0.0))
    assert all(np.array_equal(a, b) for a, b in zip(plain, never))
    once, again = (batches(intensity="synth", tissue_labels=tissue) for _ in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(once, again))
    changed = sum(not np.array_equal(a, b) for a, b in zip(plain, once))
    assert changed >= 1
    with pytest.raises(ValueError, match="tissue_labels"):
        train.make_dataset(x, y, batch_size=4, seed=3, intensity="synth")


def test_the_synth_recipe_trains_on_a_longer_schedule():
    paper = config.get_profile("paper")
    plain, drawn = paper.cunet_config(intensity="none"), paper.cunet_config(intensity="synth")
    assert plain == paper.cunet_training
    assert (drawn.epochs, drawn.early_stopping_patience, drawn.reduce_lr_patience) == (
        2 * plain.epochs, 3 * plain.early_stopping_patience, 2 * plain.reduce_lr_patience)
    assert config.SYNTH_SCHEDULE == {"epochs": 2, "early_stopping_patience": 3, "reduce_lr_patience": 2}
    assert drawn.learning_rate == plain.learning_rate and drawn.intensity == "synth"
    assert paper.cunet_config(epochs=7, intensity="synth").epochs == 7  # an explicit budget wins


def test_the_label_pool_is_new_anatomy_drawn_from_the_phantom(small):
    pool = phantom.label_map_pool(3, seed=3000, size=small.images.shape[1])
    assert pool.shape == (3,) + small.kidney_masks.shape[1:] and pool.dtype == np.uint8
    np.testing.assert_array_equal(pool, phantom.label_map_pool(3, seed=3000, size=small.images.shape[1]))
    assert all(np.isin(p, phantom.KIDNEY_TISSUES).any() for p in pool)  # slices through the kidneys
    own = phantom.tissue_label_maps(small)
    assert not any(np.array_equal(p, o) for p in pool for o in own)  # another phantom seed: other anatomy
    with pytest.raises(ValueError, match="n_cases"):
        phantom.label_map_pool(-1, seed=3000)


def test_synth_draws_take_label_maps_from_the_pool_with_their_masks(small):
    """With a pool, a synthetic item's label map (and so its kidney target) may come from other anatomy; the
    mask still follows the labels it was drawn from, and the epoch keeps its length. An empty pool changes nothing."""
    tissue = phantom.tissue_label_maps(small)
    x, y = small.images, small.kidney_masks
    labels = phantom.label_map_pool(6, seed=3000, size=x.shape[1])
    pool = (labels, np.isin(labels, phantom.KIDNEY_TISSUES).astype(np.uint8))
    no_deformation = dataclasses.replace(FIXED, p_synthetic=1.0)

    def batches(**kwargs):
        ds = train.make_dataset(x, y, batch_size=4, seed=3, epochs=2, intensity="synth", tissue_labels=tissue,
                                **kwargs)
        return [(b[0].numpy(), b[1].numpy()) for b in ds]

    plain = batches()
    empty = batches(label_pool=(labels[:0], pool[1][:0]))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(plain, empty))
    drawn = batches(label_pool=pool, synth_config=no_deformation)
    assert len(drawn) == len(plain)
    own_masks = [m for m in (y > 0)] + [np.fliplr(m) for m in (y > 0)]
    pool_masks = [m > 0 for m in pool[1]]
    pool_masks += [np.fliplr(m) for m in pool_masks]
    masks = [m[..., 0] > 0 for _, batch_masks in drawn for m in batch_masks]
    from_pool = sum(any(np.array_equal(m, p) for p in pool_masks) for m in masks)
    assert all(any(np.array_equal(m, o) for o in own_masks + pool_masks) for m in masks)
    expected = len(masks) * len(labels) / (len(x) + len(labels))  # a draw's map is uniform over own + pool
    assert 0.5 * expected <= from_pool <= 1.5 * expected
    with pytest.raises(ValueError, match="label_pool"):
        train.make_dataset(x, y, batch_size=4, seed=3, intensity="synth", tissue_labels=tissue,
                           label_pool=(labels[:, :8, :8], pool[1][:, :8, :8]))
    with pytest.raises(ValueError, match="label_pool"):
        synth.SynthConfig(label_pool=-1)
