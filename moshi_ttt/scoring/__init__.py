"""Scoring: teacher-forced per-token loss in three exact modes, TTT telemetry, peak memory."""

from moshi_ttt.scoring.teacher_forcing import ScoreResult, iter_score, score

__all__ = ["ScoreResult", "iter_score", "score"]
