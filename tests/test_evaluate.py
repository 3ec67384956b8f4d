"""``moments eval``: metric arithmetic, both annotation forms, a real run with the engine, and the
synthetic events it is measured on."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from moments.app.cli import main as cli_main
from moments.app.evaluate import (
    Annotation,
    Prediction,
    Question,
    fp_at_recall,
    load_annotations,
    metrics,
    questions,
    resolve_video,
)
from moments.tools.scoring import auroc, fit_platt, temporal_iou
from moments.tools.synthetic import random_scene, write_annotation_set


def test_temporal_iou_hand_cases():
    assert temporal_iou((0, 10), (0, 10)) == 1.0
    assert temporal_iou((0, 10), (5, 15)) == pytest.approx(5 / 15)
    assert temporal_iou((0, 4), (6, 10)) == 0.0
    assert temporal_iou((2, 4), (0, 10)) == pytest.approx(0.2)
    assert temporal_iou((3, 3), (0, 10)) == 0.0  # empty prediction
    assert temporal_iou((5, 2), (0, 10)) == 0.0  # inverted


def test_metrics_hand_cases():
    qs = [Question("v", "q1", ((0, 10),)), Question("v", "q2", ((10, 20), (40, 50))),
          Question("v", "q3", ((0, 4),)), Question("v", "absent1", ()), Question("v", "absent2", ())]
    preds = [
        Prediction(((0, 10, 0.9),), found=True, score=0.9),                    # IoU 1
        Prediction(((14, 24, 0.8), (40, 50, 0.7)), found=True, score=0.8),     # occurrences: 6/14 and 1
        Prediction((), found=False, score=0.2),                                 # missed: IoU 0
        Prediction(((1, 2, 0.6),), found=True, score=0.6),                     # a false positive
        Prediction((), found=False, score=0.1),
    ]
    m = metrics(preds, qs)
    assert m["mIoU"] == pytest.approx((1 + 6 / 14 + 1 + 0) / 4)
    assert m["R@0.5,occurrence"] == pytest.approx(2 / 4) and m["R@0.3,occurrence"] == pytest.approx(3 / 4)
    assert m["R@1,IoU=0.5"] == pytest.approx(1 / 3)  # q2's top segment overlaps less than half
    assert m["recall_present"] == pytest.approx(2 / 3) and m["false_positive_rate"] == pytest.approx(1 / 2)
    assert m["AUROC"] == pytest.approx(auroc([0.9, 0.8, 0.2], [0.6, 0.1])) == pytest.approx(5 / 6)
    assert fp_at_recall([0.9, 0.8, 0.2], [0.6, 0.1]) == pytest.approx(0.5)  # 95% recall needs 0.2: 0.6 passes it


def test_auroc_and_platt():
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0 and auroc([0.1], [0.9]) == 0.0 and auroc([0.5], [0.5]) == 0.5
    raw = [0.95, 0.9, 0.85, 0.6, 0.3, 0.2, 0.1, 0.05]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    params = fit_platt(raw, labels)
    assert params["a"] > 0  # calibration keeps the order


def test_platt_stays_finite_on_well_separated_scores_and_balances_the_classes():
    # Scores near 0 and 1 with one overlap: plain Newton steps overshoot here (a ~1e8 was seen).
    raw = [1e-5] * 30 + [0.9] * 5 + [0.92] * 60 + [0.3] * 3
    labels = [0] * 30 + [0] * 5 + [1] * 60 + [1] * 3
    params = fit_platt(raw, labels)
    assert 0 < params["a"] < 50 and abs(params["b"]) < 50
    # Many present questions pull the plain fit's threshold down; the balanced fit does not follow.
    plain = fit_platt([0.2] * 10 + [0.6] * 90 + [0.4] * 10, [0] * 10 + [1] * 90 + [1] * 5 + [0] * 5)
    even = fit_platt([0.2] * 10 + [0.6] * 90 + [0.4] * 10, [0] * 10 + [1] * 90 + [1] * 5 + [0] * 5, balanced=True)
    assert -even["b"] / even["a"] > -plain["b"] / plain["a"]


def test_charades_and_json_annotations(tmp_path):
    charades = tmp_path / "charades.txt"
    charades.write_text("3MSZA 24.3 30.4##person turn a light on.\n\nAO8RW 0.0 6.9##a person is putting a book on a shelf.\n")
    rows = load_annotations(charades)
    assert rows == [Annotation("3MSZA", "person turn a light on.", 24.3, 30.4),
                    Annotation("AO8RW", "a person is putting a book on a shelf.", 0.0, 6.9)]
    absent = tmp_path / "absent.txt"
    absent.write_text("3MSZA - -##a dog barks\n3MSZA 1 2##a light\n3MSZA 5 6##a light\n")
    assert questions(load_annotations(absent)) == [Question("3MSZA", "a dog barks", ()),
                                                   Question("3MSZA", "a light", ((1.0, 2.0), (5.0, 6.0)))]
    as_json = tmp_path / "a.json"
    as_json.write_text(json.dumps([{"video": "x.mp4", "query": "the red circle appears", "start": 3, "end": 7.5}]))
    assert load_annotations(as_json) == [Annotation("x.mp4", "the red circle appears", 3.0, 7.5)]
    bad = tmp_path / "bad.txt"
    bad.write_text("3MSZA 24.3##no end\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        load_annotations(bad)


def test_generated_annotation_files_round_trip(tmp_path):
    path = write_annotation_set(tmp_path / "c", [20.0, 21.5], seed=3)
    rows = load_annotations(path)
    scenes = json.loads((path.parent / "scenes.json").read_text())
    assert len(rows) == sum(len(s["events"]) for s in scenes)
    for row in rows:
        assert resolve_video(path.parent, row.video).suffix == ".mp4"
        assert 0 <= row.start_s < row.end_s <= 21.5
    mixed = write_annotation_set(tmp_path / "m", [300.0], seed=4, absent_per_video=3,
                                 event_kwargs={"event_s": (2.0, 8.0), "repeat_fraction": 1.0})
    qs = questions(load_annotations(mixed))
    assert sum(not q.occurrences for q in qs) == 3
    assert any(len(q.occurrences) >= 2 for q in qs)  # repeated events: one row per occurrence
    assert all(2.0 <= b - a <= 8.0 for q in qs for a, b in q.occurrences)
    json_path = write_annotation_set(tmp_path / "j", [20.0], seed=3, json_form=True)
    assert [(r.query, r.start_s, r.end_s) for r in load_annotations(json_path)] == \
           [(r.query, r.start_s, r.end_s) for r in rows if r.video.endswith("_000_20s")]


def test_eval_command_runs_the_engine_on_real_files(tmp_path, tiny_model_dir, capsys):
    """The harness end to end on two generated videos with a random tiny model: scores are
    whatever they are, the report must be complete and consistent."""
    ann = write_annotation_set(tmp_path / "videos", [20.0, 24.5], seed=1, absent_per_video=1)
    report = tmp_path / "report.json"
    rc = cli_main(["eval", str(ann), "--report", str(report),  # videos beside the annotations: the default
                   "--model", str(tiny_model_dir), "--device", "cpu", "--max-frames", "16",
                   "--budget-tokens", "512", "--max-new-tokens", "12"])
    assert rc == 0
    data = json.loads(report.read_text())
    n = len(questions(load_annotations(ann)))
    assert data["backend"] == "engine" and data["metrics"]["questions"] == n and len(data["results"]) == n
    for k in ("mIoU", "R@0.5,occurrence", "recall_present", "false_positive_rate", "AUROC", "passes/query"):
        assert k in data["metrics"]
    assert all(0.0 <= v <= 1.0 for k, v in data["metrics"].items() if k in ("mIoU", "recall_present"))
    assert data["metrics"]["passes/query"] > 0
    assert any(k.startswith("video ") for k in data["buckets"])
    for row in data["results"]:
        assert isinstance(row["raw_answer"], str) and all(0.0 <= i <= 1.0 for i in row["ious"])
    assert "mIoU" in capsys.readouterr().out


def test_eval_command_names_missing_videos_before_any_work(tmp_path, capsys):
    """A wrong videos folder fails at once, with the missing names and exit status 2, no report."""
    ann = write_annotation_set(tmp_path / "videos", [20.0, 24.5], seed=1)
    (tmp_path / "elsewhere").mkdir()
    report = tmp_path / "report.json"
    rc = cli_main(["eval", str(ann), "--videos-dir", str(tmp_path / "elsewhere"), "--report", str(report),
                   "--model", str(tmp_path / "no-such-model")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "2 of 2 videos not found" in err and "synth001_000_20s" in err and "--videos-dir" in err
    assert not report.exists()


def test_move_events_slide_left_during_their_interval():
    """A "moves left" object is on screen throughout: still before its interval, sliding left during
    it, still (further left) after it. An "appears" object is on screen only in its interval."""
    from moments.tools.synthetic import Event, render_frame

    move, appear = Event("blue", "circle", 10.0, 20.0, lane=0, kind="move"), Event("red", "square", 5.0, 8.0, lane=2)
    assert move.query == "the blue circle moves left" and appear.query == "the red square appears"

    def centre_x(t, color):
        f = render_frame(224, 168, t, [move, appear]).astype(int)
        want = {"blue": (40, 80, 230), "red": (220, 30, 30)}[color]
        mask = (np.abs(f - want).sum(-1) < 30)
        return float(np.nonzero(mask)[1].mean()) if mask.any() else None

    xs = [centre_x(t, "blue") for t in (0.0, 9.9, 12.5, 15.0, 17.5, 20.0, 30.0)]
    assert xs[0] == xs[1] and xs[-2] == xs[-1] and xs[1] > xs[2] > xs[3] > xs[4] > xs[5]
    assert centre_x(4.9, "red") is None and centre_x(6.0, "red") is not None and centre_x(8.0, "red") is None
    rng_scenes = [random_scene(random.Random(s), 60.0, move_fraction=0.5) for s in range(20)]
    kinds = {e.kind for sc in rng_scenes for e in sc.events}
    assert kinds == {"appear", "move"}
    assert {e.kind for s in range(20) for e in random_scene(random.Random(s), 60.0).events} == {"appear"}
