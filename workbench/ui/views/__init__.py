"""The app's views: each takes the `WorkbenchState` and only lays out widgets and charts."""
