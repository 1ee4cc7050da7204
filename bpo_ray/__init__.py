"""bpo-ray: Bootstrapped Preference Optimization (BPO) for multimodal LLMs, as a Ray application.

Stages (each a ``ray job submit`` target and a ``bpo-ray <stage>`` command): generate, reference,
train, serve, evaluate. See DESIGN.md in the shared folder for the data contracts.
"""

__version__ = "0.1.0"
