"""Model building (tiny, offline), loading (local / s3:// / hub) and prompt formatting."""
