"""The MCP server: personas, knowledge, layers and the Academy as tools and resources for agents."""
