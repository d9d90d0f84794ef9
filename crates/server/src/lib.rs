//! vidgen-server: the HTTP edge. It never touches tensors: jobs run in `vidgen worker` processes.
