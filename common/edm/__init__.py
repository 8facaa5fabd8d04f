"""The unconditional (EDM) wing: preconditioning and losses (Karras et al. 2022), EDM networks on diffusers'
``UNet2DModel`` with DiffMemorize's skip masks, EDM dataset zips, the training schedule and the EDM sampler.

It imports only from ``common`` itself (trainer, seeding, results, errors, CLI helpers), never from
``common.t2i``; what both wings need lives in ``common``.
"""
