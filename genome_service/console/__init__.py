"""The web console: static files (native ES modules and Web Components, no build step) in
`static/`, served at `/console/` by `genome_service.api.console`. It calls the REST and SSE
API like any other client."""
