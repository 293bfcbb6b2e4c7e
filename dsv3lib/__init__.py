"""dsv3lib: DeepSeek-V3 built piece by piece, the library behind the dsv3-book chapters."""
