"""SpillMap: a dict until its bound, a temporary SQLite file after, the same answers either way."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exlab_wizard.sync import spill
from exlab_wizard.sync.spill import SpillMap, items_by_bytes, keys_by_bytes

NAMES = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00") | st.sampled_from(["\udcff", "\udc80"]),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["set", "del"]), NAMES, st.text(max_size=4) | st.tuples(st.integers(), st.integers())
        ),
        max_size=60,
    ),
    bound=st.integers(min_value=0, max_value=8),
)
def test_same_answers_as_a_dict_on_either_side_of_the_bound(ops, bound) -> None:
    spill_pending = spill._PENDING
    spill._PENDING = 3  # flushes inside the run of operations, not only at the end
    try:
        mine: SpillMap = SpillMap(spill_at=bound)
        model: dict = {}
        peak = 0
        for op, key, value in ops:
            if op == "set":
                mine[key] = value
                model[key] = value
            elif key in model:
                del mine[key]
                del model[key]
            else:
                with pytest.raises(KeyError):
                    del mine[key]
            assert (key in mine) == (key in model)
            peak = max(peak, len(model))
        assert len(mine) == len(model)
        assert dict(mine.items()) == model
        assert sorted(mine) == sorted(model)
        assert [k for k, _v in items_by_bytes(mine)] == sorted(model, key=os.fsencode)
        assert list(keys_by_bytes(mine)) == sorted(model, key=os.fsencode)
        assert list(items_by_bytes(model)) == [(k, model[k]) for k in sorted(model, key=os.fsencode)]
        assert mine.spilled == (peak > bound)  # on disk once past its bound, and only then
    finally:
        spill._PENDING = spill_pending


def test_spills_past_its_bound_and_answers_from_disk() -> None:
    mine: SpillMap = SpillMap(spill_at=100)
    keys = [f"f{i % 7}/s_{i:05d}" for i in range(1000)]  # not in byte order
    for index, key in enumerate(keys):
        mine[key] = (index, index * 2)
    assert mine.spilled
    assert sorted(mine) == sorted(keys)
    assert mine["f3/s_00010"] == (10, 20)
    assert mine.get("nope") is None
    assert [k for k, _v in mine.ordered_items()] == sorted(keys)
    del mine["f3/s_00010"]
    assert "f3/s_00010" not in mine and len(mine) == 999
    mine.close()
    assert len(mine) == 0
    small: SpillMap = SpillMap()
    small["a"] = "b"
    small.close()  # in memory: emptied too
    assert len(small) == 0 and "a" not in small


def test_threads_writing_at_once_lose_nothing() -> None:
    mine: SpillMap = SpillMap(spill_at=500)

    def write(base: int) -> None:
        for index in range(3000):
            mine[f"t{base}/{index}"] = f"{base}:{index}"

    threads = [threading.Thread(target=write, args=(base,)) for base in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mine.spilled and len(mine) == 12_000
    assert all(mine[f"t{b}/{i}"] == f"{b}:{i}" for b in range(4) for i in range(0, 3000, 7))


_FULL_CHILD = """
import sys
from exlab_wizard.sync.spill import SpillMap
mine = SpillMap(spill_at=200)
payload = "x" * 2000
seen = []
for index in range(int(sys.argv[1])):
    mine[f"f/{index:06d}"] = payload + str(index)
    if index == 250:
        seen.append("spilled" if mine.spilled else "memory")
assert len(mine) == int(sys.argv[1]), len(mine)
assert all(mine[f"f/{i:06d}"] == payload + str(i) for i in range(int(sys.argv[1])))
seen.append("spilled" if mine.spilled else "memory")
print(" ".join(seen))
"""


def test_a_full_temporary_folder_keeps_every_record_in_memory(tmp_path: Path) -> None:
    """A temporary folder that fills up as the map spills: every record is kept, back in memory."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0:
        pytest.fail("the test mounts a 1 MiB tmpfs: run as root (as CI does)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        env = {**os.environ, "SQLITE_TMPDIR": str(small), "TMPDIR": str(small)}
        done = subprocess.run(
            [sys.executable, "-c", _FULL_CHILD, "6000"], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        # 400 KB spilled, then the 12 MB of records that do not fit in 1 MiB taken back into memory.
        assert done.stdout.strip() == "spilled memory"
        assert os.listdir(small) == []  # SQLite's temporary file is gone with it
        # Room enough: the same records on disk.
        done = subprocess.run([sys.executable, "-c", _FULL_CHILD, "300"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "spilled spilled"
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_lookups_in_any_order_answer_from_disk_as_a_dict_does() -> None:
    """Rows read ahead or one at a time, whatever the order; a write or delete between lookups is seen."""
    rng = random.Random(7)
    keys = [f"d{i // 50:03d}/f{i:05d}" for i in range(5000)]
    mine: SpillMap = SpillMap(spill_at=0)
    model = {}
    for key in keys[::2]:  # every other key stored: the rest are absent between stored ones
        mine[key] = model[key] = f"v{key}"
    in_folders = [k for start in range(0, len(keys), 50) for k in rng.sample(keys[start : start + 50], 50)]
    scattered = rng.sample(keys, len(keys))
    for order in (keys, in_folders, scattered, keys[::-1]):
        for index, key in enumerate(order):
            assert mine.get(key) == model.get(key), key
            if index % 997 == 0:  # a change now and then: what was read ahead must not hide it
                if key in model:
                    del mine[key], model[key]
                else:
                    mine[key] = model[key] = "new"
    assert dict(mine.items()) == model


def test_the_bound_from_the_environment(tmp_path: Path) -> None:
    """EXLAB_SPILL_AT sets the bound (0: on disk from the first entry); a value that is no number is ignored."""
    child = "from exlab_wizard.sync import spill; m = spill.SpillMap(); m['a'] = 'b'; print(spill.SPILL_AT, m.spilled)"
    seen = {}
    for value in ("0", "5", "many", ""):
        env = {**os.environ, spill.SPILL_AT_ENV: value}
        done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True)
        seen[value] = done.stdout.split()
    assert seen == {"0": ["0", "True"], "5": ["5", "False"], "many": ["32768", "False"], "": ["32768", "False"]}
