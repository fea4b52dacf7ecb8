"""A first end-to-end check of the engine over a file backing: random operations against a bytearray."""

import os
import random

import pytest

from cow.engine import Engine


@pytest.mark.parametrize("block_size", [4096, 65536])
@pytest.mark.parametrize("lock_mode", ["fine", "global"])
def test_random_ops_match_bytearray(backing_factory, block_size, lock_mode):
    size = 130000
    path = backing_factory(size)
    model = bytearray(open(path, "rb").read())
    rng = random.Random(block_size)
    with Engine(path, block_size=block_size, lock_mode=lock_mode) as e:
        for _ in range(1000):
            op = rng.choice("rwzt")
            off = rng.randrange(size + 1)
            cnt = rng.randrange(0, min(size - off, 3 * block_size) + 1)
            if op == "r":
                buf = bytearray(cnt)
                e.pread(buf, off)
                assert buf == model[off:off + cnt]
            elif op == "w":
                data = os.urandom(cnt)
                e.pwrite(data, off)
                model[off:off + cnt] = data
            elif op == "z":
                e.zero(cnt, off, may_trim=rng.random() < 0.5)
                model[off:off + cnt] = bytes(cnt)
            else:
                e.trim(cnt, off)
                model[off:off + cnt] = bytes(cnt)
        buf = bytearray(size)
        e.pread(buf, 0)
        assert buf == model
        pos = 0
        for length, kind in e.extents(size, 0):
            if kind & 2:
                assert model[pos:pos + length] == bytes(length)
            pos += length
        assert pos == size
