"""The Tinker API (the official `tinker` SDK's wire) on the HTTP door: docs/tinker.md."""
