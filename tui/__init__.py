"""The command line and the Textual dashboard."""
