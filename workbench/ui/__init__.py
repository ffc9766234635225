"""Panel / ipywidgets app. Imports panel lazily; the core never imports this package."""
