"""A job's images: one, or a set of one of each kind for a rack of both kinds of build; refused
before anything is sent when two are of one kind, or when none fits the build a probe told."""

from __future__ import annotations

import pytest

from netota_daemon.daemon.jobs import FirmwareInvalid, WrongImageKind
from netota_daemon.firmware import FirmwareImage
from netota_daemon.sim.image import build_image
from tests.daemon_fakes import fired
from tests.test_daemon_jobs import World


@pytest.fixture
def world(tmp_path):
    world = World(tmp_path)
    (world.firmware_dir / "single.ufw").write_bytes(build_image("2.0.0", 4096, "single"))
    (world.firmware_dir / "double.ufw").write_bytes(build_image("2.0.0", 4096, "double"))
    (world.firmware_dir / "double-too.ufw").write_bytes(build_image("2.1.0", 4096, "double"))
    return world


def test_a_set_of_one_image_of_each_kind_reaches_the_engine_and_is_journaled(world):
    job = world.start("a", ["single.ufw", "double.ufw"])
    assert (job["firmware"], job["firmware_set"]) == ("single.ufw", ["single.ufw", "double.ufw"])
    (engine,) = world.factory.order
    assert isinstance(engine.image, tuple) and [i.path.name for i in engine.image] == ["single.ufw", "double.ufw"]
    assert all(isinstance(i, FirmwareImage) for i in engine.image)
    record = world.journal.get(job["id"])
    assert record is not None and record.firmware_set == ("single.ufw", "double.ufw")


def test_a_resumed_set_job_keeps_its_set(world):
    job = world.start("a", ["single.ufw", "double.ufw"])
    (engine,) = world.factory.order
    engine.cancel("operator")
    world.clock.advance(2)
    resumed = world.resume(job["id"])
    assert resumed["firmware_set"] == ["single.ufw", "double.ufw"]


@pytest.mark.parametrize(
    ("firmware", "words"),
    [
        (["double.ufw", "double-too.ufw"], "both double-backup images"),
        (["single.ufw", "single.ufw"], "named twice"),
        ([], "a file name, or a list"),
        (["single.ufw", 7], "a file name, or a list"),
        ([f"x{i}.ufw" for i in range(5)], "at most 4 images"),
    ],
)
def test_a_set_the_engine_could_not_choose_from_is_refused(world, firmware, words):
    with pytest.raises(FirmwareInvalid, match=words):
        world.start("a", firmware)
    assert world.factory.order == [] and world.journal.jobs() == []


@pytest.mark.parametrize(("mode", "refused"), [("double_backup", True), ("main", False), ("loader", False)])
def test_an_image_that_cant_fit_the_build_a_probe_told_is_refused(world, mode, refused):
    world.registry.probed("a", {"ok": True, "mode": mode, "time": 1.0}, None)
    if refused:
        with pytest.raises(WrongImageKind, match=r"runs a double-backup build.*can't cross-upgrade"):
            world.start("a", "single.ufw")
        assert world.factory.order == []
    else:
        assert world.start("a", "single.ufw")["state"] in ("running", "queued")


def test_an_image_of_unknown_kind_is_left_to_the_engine_to_send_with_a_warning(world):
    world.registry.probed("a", {"ok": True, "mode": "double_backup", "time": 1.0}, None)
    assert world.start("a", "v2.bin")["firmware_set"] == ["v2.bin"]  # random bytes: kind unknown


def test_a_failed_probe_tells_no_build(world):
    world.registry.probed("a", {"ok": False, "error": "connection refused", "time": 1.0}, None)
    assert fired(world.queue.start("a", "single.ufw"))["firmware"] == "single.ufw"
