//! `cargo bench --bench runtime`: the same measurement as
//! `shardwire bench runtime`, with smaller defaults.

fn main() {
    let options = shardwire::bench::runtime::Options {
        messages: 2_000_000,
        round_trips: 10_000,
        parked_round_trips: 1_000,
        ..Default::default()
    };
    print!("{}", shardwire::bench::runtime::run(&options).render());
}
