"""The text-to-image wing: Stable Diffusion pipelines, prompts, Wen et al.'s detection, explanation and
mitigation, text-to-image training data and the memorization lab.

It imports only from ``common`` itself (trainer, seeding, results, metrics, SSCD, errors, CLI helpers), never
from ``common.edm``; what both wings need lives in ``common``.
"""
