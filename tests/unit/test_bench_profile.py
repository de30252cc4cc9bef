"""bench/profiling.py: the event loop's share comes from the profiled process's main thread only."""

from __future__ import annotations

from pathlib import Path

from bench.profiling import top_frames

SERVICE = 'process 100:"python -m cli serve --x;y"'
PROJECTION = 'process 200:"python -m cli project --exit-with-parent 100"'


def test_the_projection_workers_main_thread_is_not_the_event_loop(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text("\n".join([
        f"{SERVICE};thread (100): MainThread;handle (service/routes.py:10);decode (domain/preprocessing.py:5) 6",
        f"{SERVICE};thread (100): MainThread;handle (service/routes.py:10) 2",
        f"{SERVICE};thread (300): inference_0;predict_batch (inference/keras_model.py:9) 3",
        f"{SERVICE};{PROJECTION};thread (200): MainThread;project_batch (projections/read_model.py:7) 5",
    ]) + "\n")
    frames = top_frames(raw)
    assert frames["loop_samples"] == 8
    assert frames["threads"] == {
        "thread (100): MainThread": 8,
        "projection worker: thread (200): MainThread": 5,
        "thread (300): inference_0": 3,
    }
    assert dict(frames["inclusive"]) == {"handle (service/routes.py)": 1.0, "decode (domain/preprocessing.py)": 0.75}
    assert dict(frames["self"]) == {"decode (domain/preprocessing.py)": 0.75, "handle (service/routes.py)": 0.25}
