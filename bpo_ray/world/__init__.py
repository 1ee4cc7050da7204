"""The bias world: a synthetic scene data set whose text corpus carries a co-occurrence prior that
the images do not obey, so a tiny MLLM trained on it hallucinates in the way BPO corrects."""
