import os

import torch

from augment import CustomAugmentation, DeviceAugment, create_transforms
from cache import DecodedCache
from dataset import MultiLabelDataset, decode_image, scan_people


def test_cache_is_byte_identical_and_rebuilds_on_change(tiny_data, tmp_path, monkeypatch):
    table = scan_people(tiny_data / "train")
    paths = list(table["path"])
    transform = CustomAugmentation((64, 48), train=False)
    cache = DecodedCache.build(paths, transform, tmp_path, num_workers=0)
    for row in (0, 5, len(paths) - 1):
        assert torch.equal(cache[row], transform.prepare(decode_image(paths[row])))
    assert len(list(tmp_path.glob("*.u8"))) == 1
    again = DecodedCache.build(paths, transform, tmp_path)
    assert again.data_path == cache.data_path
    monkeypatch.chdir(tiny_data)  # the same files by relative paths: the same cache
    relative = [os.path.relpath(p, tiny_data) for p in paths]
    assert DecodedCache.build(relative, transform, tmp_path).data_path == cache.data_path
    monkeypatch.undo()

    other = DecodedCache.build(paths, CustomAugmentation((32, 24), train=False), tmp_path)
    assert other.data_path != cache.data_path and other[0].shape == (3, 32, 24)

    stat = os.stat(paths[3])
    os.utime(paths[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = DecodedCache.build(paths, transform, tmp_path)
    assert touched.data_path not in (cache.data_path, other.data_path)
    assert len(list(tmp_path.glob("*.u8"))) == 3 and not list(tmp_path.glob(".*.tmp"))


def test_dataset_reads_the_cache_and_still_augments(tiny_data, tmp_path):
    dataset = MultiLabelDataset(tiny_data / "train")
    train_tf, val_tf = create_transforms("CustomAugmentation", (64, 48))
    plain = dataset.split_dataset(train_tf, val_tf)[1][0][0]
    dataset.cache = DecodedCache.build(dataset.table["path"], val_tf, tmp_path, num_workers=2)
    train, val = dataset.split_dataset(train_tf, val_tf)
    assert torch.equal(val[0][0], plain)
    prepared = dataset.cache[int(train.indices[0])]
    draws = [train[0][0] for _ in range(16)]
    assert all(torch.equal(d, prepared) or torch.equal(d, prepared.flip(-1)) for d in draws)
    assert any(torch.equal(d, prepared) for d in draws) and any(torch.equal(d, prepared.flip(-1)) for d in draws)


def test_device_augment_flip_is_the_flip_of_the_batch():
    images = torch.rand(6, 3, 8, 10)
    assert torch.equal(DeviceAugment(flip=1.0, crop_scale=None, brightness=0, contrast=0)(images), images.flip(3))
    assert torch.equal(DeviceAugment(flip=0.0, crop_scale=None, brightness=0, contrast=0)(images), images)
    generator = torch.Generator().manual_seed(3)
    chosen = torch.rand(6, generator=torch.Generator().manual_seed(3)) < 0.5
    out = DeviceAugment(flip=0.5, crop_scale=None, brightness=0, contrast=0, generator=generator)(images)
    for i in range(6):
        assert torch.equal(out[i], images[i].flip(2) if chosen[i] else images[i])


def test_device_augment_crop_and_colour_keep_range_and_identity():
    images = torch.rand(4, 3, 16, 12)
    same = DeviceAugment(flip=0, crop_scale=(1.0, 1.0), brightness=0, contrast=0)(images)
    assert torch.allclose(same, images, atol=1e-5)
    out = DeviceAugment(generator=torch.Generator().manual_seed(0))(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, images)


def test_mixup_and_cutmix_mix_images_and_report_the_share():
    from augment import mix_batch
    torch.manual_seed(0)
    a = torch.zeros(2, 3, 20, 10)
    a[1] = 1.0
    mixed, permutation, lam = mix_batch(a, mixup_alpha=1.0)
    for i in range(2):
        assert torch.allclose(mixed[i], lam * a[i] + (1 - lam) * a[permutation[i]])
    for _ in range(5):
        mixed, permutation, lam = mix_batch(a, cutmix_alpha=1.0)
        for i in range(2):
            from_other = (mixed[i] != a[i]).float().mean().item() if permutation[i] != i else None
            if from_other is not None:
                assert abs(from_other - (1 - lam)) < 1e-6
