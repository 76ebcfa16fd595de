def build(run, points, started, ended):
    return {"scenario": run.name, "capture_points": points}
