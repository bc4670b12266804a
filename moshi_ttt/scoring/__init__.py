"""Scoring: teacher-forced per-token loss in three exact modes, TTT telemetry, peak memory."""

from moshi_ttt.scoring.teacher_forcing import BlockScorer, ScoreResult, iter_score, iter_score_blocks, score

__all__ = ["BlockScorer", "ScoreResult", "iter_score", "iter_score_blocks", "score"]
