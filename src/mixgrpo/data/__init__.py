"""Data adapters: prompt files."""

from .prompt_files import PromptFileError, read_prompt_file

__all__ = ["PromptFileError", "read_prompt_file"]
