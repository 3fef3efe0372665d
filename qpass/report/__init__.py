"""Reports a person reads: outlier analysis (`outliers`) rendered as HTML with plots (`html`) and JSON."""
