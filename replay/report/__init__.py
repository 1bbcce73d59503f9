"""Reports: Markdown, HTML, SVG charts and run-to-run compare, read from run directories."""
