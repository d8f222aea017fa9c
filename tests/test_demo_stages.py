"""`vldus demo` without running it: bad input, defaults, how it reads the detector's validation,
and how it schedules stages side by side (child processes, threads, the order of the test
passes). Kept apart from tests/test_demo.py so that these run on the pytest-xdist worker that
does not train the quick demo."""
import json
import os

import pytest


@pytest.mark.parametrize("argv,expected", [
    (["--unseen", "purple blob"], "--unseen: 'purple blob'"),
    (["--unseen", "blue circle,blue square,blue triangle,blue star"], "--unseen"),
    (["--clip-weights", "/nonexistent/clip.safetensors"], "/nonexistent/clip.safetensors: CLIP weights file"),
    (["--clip-arch", "ViT-B-32"], "--clip-arch: needs --clip-weights"),
    (["--set", "detector.roi_sampling=1"], "roi_sampling_ratio"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, cli_error, argv, expected):
    err = cli_error(["demo", "--out", str(tmp_path / "out"), "--quick", *argv])
    assert expected in err
    assert not os.path.exists(tmp_path / "out")  # refused before any work


def test_out_defaults_to_the_makefiles_demo_out():
    from vldus.cli import build_parser

    assert build_parser().parse_args(["demo"]).out == "demo_out"


def test_detector_validation_from_either_file(tmp_path):
    """The demo reads validation mAP from the detector's metrics.json, or from its log.jsonl."""
    from vldus.runner import detector_validation

    (tmp_path / "log.jsonl").write_text(
        '{"epoch": 1, "iter": 10, "loss": 1.0}\n'
        '{"epoch": 1, "loss": 1.0, "val": {"seen_map": {"0.5": 40.0}}}\n'
        '{"epoch": 2, "loss": 0.5, "val": {"seen_map": {"0.5": 55.5}}}\n')
    assert detector_validation(str(tmp_path)) == {"val_seen_map50": 55.5, "per_epoch": [40.0, 55.5]}
    (tmp_path / "metrics.json").write_text(json.dumps({"validation": {
        "per_epoch": [{"epoch": 1, "val_seen_map50": 41.0}, {"epoch": 2, "val_seen_map50": 60.0}],
        "last": {"epoch": 2, "val_seen_map50": 60.0}}}))
    assert detector_validation(str(tmp_path)) == {"val_seen_map50": 60.0, "per_epoch": [41.0, 60.0]}
    (tmp_path / "metrics.json").write_text("{}")
    assert detector_validation(str(tmp_path)) == {}


def test_a_failed_child_stage_is_reported(tmp_path, capsys):
    """A stage in a child process (train-clip beside train-detector) that fails stops the demo
    with its exit code and the end of its log on stderr (bad input: its one error line, as in the
    foreground); its time is still recorded. (The quick demo runs the path that succeeds.)"""
    from vldus.runner import StageFailed, Stages

    stages = Stages(quiet=True)
    job = stages.start("train-clip", ["train-clip", "--steps", "many"], 1, str(tmp_path / "work" / "clip.log"),
                       "train-detector")
    with pytest.raises(StageFailed) as failed:
        stages.finish(job)
    assert failed.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "many" in err[0]
    assert stages.concurrent == {"train-clip": "train-detector"} and 0 < stages.timings["train-clip"] < 60


def test_resume_skips_the_finished_stages(tmp_path, monkeypatch):
    """``vldus run --resume``: the stage commands a run finished (recorded after each in
    work/stages.json) are skipped, a failed one is not recorded and runs again, and
    train-detector / train-generator continue from their checkpoints (--resume)."""
    from vldus import cli
    from vldus.runner import StageFailed, Stages

    ran = []
    monkeypatch.setattr(cli, "main", lambda argv: ran.append(argv) or (3 if "fail" in argv else 0))
    done = str(tmp_path / "stages.json")
    first = Stages(quiet=False, done_file=done)
    first.run("features", ["extract-features", "--config", "c.yaml"])
    first.run("detector", ["train-detector", "--config", "c.yaml"])
    with pytest.raises(StageFailed):
        first.run("synthesizer", ["train-generator", "fail"])
    assert ran == [["extract-features", "--config", "c.yaml"], ["train-detector", "--config", "c.yaml"],
                   ["train-generator", "fail"]]
    ran.clear()
    again = Stages(quiet=False, done_file=done, resume=True)
    again.run("features", ["extract-features", "--config", "c.yaml"])
    again.run("detector", ["train-detector", "--config", "c.yaml"])
    again.run("features (other)", ["extract-features", "--config", "d.yaml"])
    with pytest.raises(StageFailed):
        again.run("synthesizer", ["train-generator", "fail"])
    assert ran == [["extract-features", "--config", "d.yaml"], ["train-generator", "fail", "--resume"]]
    ran.clear()
    Stages(quiet=False, done_file=done).run("features", ["extract-features", "--config", "c.yaml"])
    assert ran == [["extract-features", "--config", "c.yaml"]]  # without --resume everything runs


def test_a_failed_torchrun_stage_is_reported(tmp_path):
    """A stage run as torchrun processes (train-detector on two or more threads) that fails stops
    the demo; its time is still recorded. (The default demo runs the path that succeeds; one
    process here: a second would only import torch again before failing the same way.)"""
    from vldus.runner import StageFailed, Stages

    stages = Stages(quiet=True)
    with pytest.raises(StageFailed) as failed:
        stages.run_ranks("train-detector", ["train-detector", "--config", str(tmp_path / "missing.yaml")], 1, 1)
    assert failed.value.code != 0 and 0 < stages.timings["train-detector"] < 60


class RecordingStages:
    """Stands in for :class:`vldus.runner.Stages`: records what would run where, with how many
    torch threads; ``fail`` names a stage that fails here."""

    def __init__(self, fail: str = ""):
        self.calls: list[tuple] = []
        self.killed: list[str] = []
        self.fail = fail

    def run(self, name, argv):
        import torch

        from vldus.runner import StageFailed

        self.calls.append(("here", name, torch.get_num_threads()))
        if name == self.fail:
            raise StageFailed(name, 1)

    def run_ranks(self, name, argv, ranks, threads):
        self.calls.append(("torchrun", name, ranks, threads, argv[-2:]))

    def start(self, name, argv, threads, log, beside):
        from types import SimpleNamespace

        self.calls.append(("child", name, threads, beside, os.path.basename(log)))
        return SimpleNamespace(name=name, proc=SimpleNamespace(kill=lambda: self.killed.append(name)))

    def finish(self, job):
        self.calls.append(("finish", job.name))


def demo_schedule(monkeypatch, rows, cores: int, region_rows=None, stages=None) -> RecordingStages:
    """What :func:`vldus.runner.rows_and_results` runs for ``rows`` (every row but no_synthesis has a
    synthesizer) and ``region_rows`` on ``cores`` cores with four torch threads; test passes are
    recorded as ("test", row, threads)."""
    from types import SimpleNamespace

    import torch

    from vldus import runner as demo

    stages = stages or RecordingStages()

    def tested(run, name):
        stages.calls.append(("test", name, torch.get_num_threads()))
        return {}

    monkeypatch.setattr(demo, "usable_cores", lambda: cores)
    monkeypatch.setattr(demo, "row_classifier", lambda run, name, variant: (
        None if variant.generator is None else (f"synthesizer ({name})", ["train-generator", name])))
    monkeypatch.setattr(demo, "row_results", tested)
    monkeypatch.setattr(demo, "region_row", lambda run, row: tested(run, row.name))
    run = SimpleNamespace(rows=rows, region_rows=region_rows or {}, stages=stages,
                          cfg=SimpleNamespace(path=lambda name: f"/out/work/{name}"))
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert list(demo.rows_and_results(run)) == [*rows, *(region_rows or {})]  # the rows' order
    finally:
        after = torch.get_num_threads()
        torch.set_num_threads(threads)
        assert after == 4  # given back, also after a failure
    return stages


def test_synthesizers_train_two_at_a_time(monkeypatch):
    """On two or more cores the synthesizers train in pairs in the rows' order (the second in a
    child process), each with half of torch's threads, one left over alone with all of them;
    meanwhile the rows that are ready are tested here. On one core everything runs in turn."""
    from vldus.runner import ABLATION, REGION_ROWS, ROWS

    def child(row, here, threads=2):
        return ("child", f"synthesizer ({row})", threads, f"synthesizer ({here})", f"synth_{row}.log")

    def here(row, threads=2):
        return ("here", f"synthesizer ({row})", threads)

    def test(row, threads=2):
        return ("test", row, threads)

    assert demo_schedule(monkeypatch, ROWS, 2, REGION_ROWS).calls == [
        child("synthesis_vldus", "synthesis_su"), here("synthesis_su"),
        test("no_synthesis"), test("synthesis_su"), test("clip_regions"),  # beside synthesis_vldus
        ("finish", "synthesizer (synthesis_vldus)"), test("synthesis_vldus", 4), test("vldus_ensemble", 4)]
    calls = demo_schedule(monkeypatch, ROWS | ABLATION, 8).calls
    assert [c for c in calls if c[0] == "child"] == [
        child("synthesis_vldus", "synthesis_su"), child("vldus_released", "vldus_clip_text_embeddings"),
        child("vldus_clip_exclude_unseen", "vldus_distill_d_only")]
    assert calls[-2:] == [("finish", "synthesizer (vldus_clip_exclude_unseen)"), test("vldus_clip_exclude_unseen", 4)]
    odd = {k: v for k, v in (ROWS | ABLATION).items() if k != "synthesis_su"}
    assert demo_schedule(monkeypatch, odd, 2).calls[-3:] == [
        here("vldus_clip_exclude_unseen", 4), test("vldus_distill_d_only", 4), test("vldus_clip_exclude_unseen", 4)]
    assert demo_schedule(monkeypatch, ROWS, 1, REGION_ROWS).calls == [
        here("synthesis_su", 4), test("no_synthesis", 4), test("synthesis_su", 4), test("clip_regions", 4),
        here("synthesis_vldus", 4), test("synthesis_vldus", 4), test("vldus_ensemble", 4)]


def test_a_failed_stage_here_stops_the_one_beside_it(monkeypatch):
    """A synthesizer that fails here kills the child process beside it; the threads are given back."""
    from vldus.runner import ROWS, StageFailed

    stages = RecordingStages(fail="synthesizer (synthesis_su)")
    with pytest.raises(StageFailed):
        demo_schedule(monkeypatch, ROWS, 2, stages=stages)
    assert stages.killed == ["synthesizer (synthesis_vldus)"] and stages.calls[-1][0] == "here"


@pytest.mark.parametrize("threads,batch,cuda,ranks", [(1, 4, False, 1), (2, 4, False, 2), (2, 3, False, 1),
                                                      (16, 4, False, 2), (16, 4, True, 1)])
def test_detector_ranks(threads, batch, cuda, ranks):
    """Two CPU processes where there are threads for them; one process on a GPU."""
    from vldus.runner import detector_ranks

    assert detector_ranks(threads, batch, cuda) == ranks


@pytest.mark.parametrize("threads,clips,per_rank", [(1, 1, None), (2, 1, 1), (4, 1, 1), (4, 0, 2), (8, 1, 2)])
def test_detector_trains_in_two_processes_with_two_threads(monkeypatch, threads, clips, per_rank):
    """With two or more torch threads the detector trains as two torchrun processes sharing the
    threads a CLIP's child process beside them leaves, each with half the batch (the global batch
    stays the config's); with one thread, here."""
    from types import SimpleNamespace

    import torch

    from vldus import runner as demo
    from vldus.detection import train

    stages = RecordingStages()
    monkeypatch.setattr(train, "latest_checkpoint", lambda folder: folder + "/epoch_2.pth")
    monkeypatch.setattr(demo, "detector_validation", lambda folder: {})
    run = SimpleNamespace(stages=stages, base=["--config", "c.yaml"],
                          cfg=SimpleNamespace(train=SimpleNamespace(batch_size=4),
                                              path=lambda name: f"/out/work/{name}"))
    clip = SimpleNamespace(name="train-clip", proc=SimpleNamespace(kill=lambda: None))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        demo.train_seen_detector(run, [clip] * clips)
    finally:
        torch.set_num_threads(before)
    if per_rank is None:
        assert stages.calls == [("here", "train-detector", 1)]
    else:
        assert stages.calls == [("torchrun", "train-detector", 2, per_rank, ["--set", "train.batch_size=2"])]
    assert run.checkpoint == "/out/work/detector/epoch_2.pth"
