"""The judge proxy and its one client.

An OpenAI-compatible endpoint in front of GPT-4 or any OpenAI-compatible upstream (``proxy``):
the upstream key stays server-side (``upstream``), clients authenticate with the proxy's own
tokens (``auth``), deterministic requests are cached (``cache``), rate limited (``limits``) and
counted (``usage``). Every part of bpo-ray that asks a judge (evaluate, judge-ranked and on-policy
pairs, the annotation job) goes through ``client``.
"""
