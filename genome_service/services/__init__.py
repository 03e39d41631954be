"""Feature services, one module per resource (reads, access rules, commands), over the command
handler (load aggregate -> decide -> append, + inline projections) that every write goes through."""
