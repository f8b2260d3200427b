# See scripts/soak.
seconds = String.to_integer(List.first(System.argv()) || "60")

unless System.get_env("SOAK_LOG") == "1", do: Logger.configure(level: :critical)

IO.puts("==> soak for #{seconds} s: 4 workers, 50 topics, chaos on the dispatcher, registry and supervisor")
result = Drab.Presence.Soak.run(seconds: seconds, progress_every_ms: 5_000)
IO.puts(Drab.Presence.Soak.summary(result))
