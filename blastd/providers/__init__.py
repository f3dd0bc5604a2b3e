"""Provider adapters: one module per messaging API kind, video/ for the render APIs."""
