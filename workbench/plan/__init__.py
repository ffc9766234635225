"""The plan currency: Plan and ResolvedPlan, edits, the budget allocator, the plan's transforms."""
