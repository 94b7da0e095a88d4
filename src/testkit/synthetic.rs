//! Seeded, reproducible generator of realistic FHIR R4 bulk-export NDJSON.
//!
//! It exists so that the CLI's `demo` command, the tests and the benchmarks can
//! work on data that looks, weighs and compresses like a real Synthea bulk
//! export without shipping one: US Core `meta.profile`s, identifiers with
//! system URLs, race/ethnicity/birth-sex extensions, codings drawn from small
//! tables of real SNOMED CT, LOINC, RxNorm and CVX codes, `Patient/<id>`
//! references, ISO 8601 timestamps with UTC offsets and base64 clinical notes.
//! The people are invented; only the codes are real.
//!
//! What a caller may rely on:
//! - Same seed and same sequence of calls give byte-identical output on every
//!   platform and build: nothing reads the clock, the OS or a hash map, floats
//!   only go through IEEE-exact arithmetic, and JSON is written by hand in a
//!   fixed key order, whatever serde_json features the build enables.
//! - Every line is one compact JSON object, `resourceType` first and `id`
//!   (a UUID-shaped string) second, with no newline byte inside.
//! - A resource of type `T` at index `i` belongs to patient `i / n`, where `n`
//!   is `T`'s count in [`export_plan`]`(1)`. So when, for every entry of
//!   [`export_plan`]`(p)`, indices `0..count` are generated (as calling
//!   [`Generator::ndjson`] once per entry on a fresh generator does), every
//!   `Patient/`, `Encounter/`, `Condition/` and `Observation/` reference
//!   resolves inside that export. Practitioners, organizations and locations
//!   are conditional references (`Practitioner?identifier=...`), as in Synthea.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The resource types [`Generator::resource`] knows how to shape, in the order
/// [`export_plan`] lists them. Other types still get a minimal valid resource.
#[rustfmt::skip]
pub const RESOURCE_TYPES: &[&str] = &[
    "Patient", "Encounter", "Observation", "Condition", "MedicationRequest", "Procedure", "Immunization",
    "DiagnosticReport", "AllergyIntolerance", "DocumentReference",
];

/// How many resources of each type an export of `patients` patients holds, in
/// [`RESOURCE_TYPES`] order: fixed integer multiples of `patients`
/// (saturating). Generating indices `0..count` of every entry yields a
/// referentially consistent export.
pub fn export_plan(patients: u64) -> Vec<(&'static str, u64)> {
    let counts = RESOURCE_TYPES.iter().zip(PER_PATIENT);
    counts
        .map(|(t, n)| (*t, patients.saturating_mul(n)))
        .collect()
}

fn fnv1a(s: &str) -> u64 {
    (s.bytes()).fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn fmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64: tiny, fast, and identical everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        fmix(self.0)
    }
    /// In `0..n` by multiply-shift; its bias is far below anything visible here.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// A version-4-shaped UUID, so that strict UUID parsers accept the ids.
    fn uuid(&mut self) -> String {
        let a = (self.next() & !0xf000) | 0x4000;
        let b = (self.next() & !(3 << 62)) | (2 << 62);
        let (a1, a2, a3) = (a >> 32, (a >> 16) & 0xffff, a & 0xffff);
        let (b1, b2) = (b >> 48, b & 0xffff_ffff_ffff);
        format!("{a1:08x}-{a2:04x}-{a3:04x}-{b1:04x}-{b2:012x}")
    }
}

// Writing into a String cannot fail.
macro_rules! w {
    ($o:expr, $($a:tt)*) => {
        let _ = write!($o, $($a)*);
    };
}

/// Serialized JSON, to nest inside `obj!` and `arr!`.
#[derive(Clone)]
struct Raw(String);

/// A value `obj!` and `arr!` can write; absent values (`None`) are left out.
trait J {
    fn json(&self, o: &mut String);
    fn present(&self) -> bool {
        true
    }
}

impl J for &str {
    fn json(&self, o: &mut String) {
        o.push('"');
        for c in self.chars() {
            match c {
                '"' => o.push_str("\\\""),
                '\\' => o.push_str("\\\\"),
                '\n' => o.push_str("\\n"),
                c if (c as u32) < 0x20 => {
                    w!(o, "\\u{:04x}", c as u32);
                }
                c => o.push(c),
            }
        }
        o.push('"');
    }
}

impl J for String {
    fn json(&self, o: &mut String) {
        self.as_str().json(o);
    }
}

impl J for Raw {
    fn json(&self, o: &mut String) {
        o.push_str(&self.0);
    }
}

// Rust formats numbers itself (shortest round-trip for f64), so the digits do
// not depend on the platform's C library.
macro_rules! display_json {
    ($($t:ty),*) => {$(
        impl J for $t {
            fn json(&self, o: &mut String) {
                w!(o, "{self}");
            }
        }
    )*};
}
display_json!(bool, u64, f64);

impl<T: J> J for Option<T> {
    fn json(&self, o: &mut String) {
        if let Some(v) = self {
            v.json(o);
        }
    }
    fn present(&self) -> bool {
        self.is_some()
    }
}

impl<T: J> J for Vec<T> {
    fn json(&self, o: &mut String) {
        let mut first = true;
        o.push('[');
        self.iter().for_each(|v| put(o, &mut first, "", v));
        o.push(']');
    }
}

/// Appends `key` and `v` to an open JSON container unless `v` is absent.
fn put(o: &mut String, first: &mut bool, key: &str, v: &impl J) {
    if v.present() {
        if !std::mem::take(first) {
            o.push(',');
        }
        o.push_str(key);
        v.json(o);
    }
}

/// A JSON object whose keys keep the order written; absent values are left out.
macro_rules! obj {
    ($($k:literal : $v:expr),* $(,)?) => {{
        let (mut o, mut first) = (String::from("{"), true);
        $(put(&mut o, &mut first, concat!("\"", $k, "\":"), &$v);)*
        o.push('}');
        Raw(o)
    }};
}

/// A JSON array of values of mixed types; absent values are left out.
macro_rules! arr {
    ($($v:expr),* $(,)?) => {{
        let (mut o, mut first) = (String::from("["), true);
        $(put(&mut o, &mut first, "", &$v);)*
        o.push(']');
        Raw(o)
    }};
}

const DAY: i64 = 86_400;
const YEAR: i64 = 365 * DAY + DAY / 4;
/// The export's "now" (2024-08-01T00:00:00Z); fixed so output never depends on the clock.
const NOW: i64 = 1_722_470_400;

/// (year, month, day) of a Unix time, by Howard Hinnant's days-to-civil.
fn civil(t: i64) -> (i64, i64, i64) {
    let z = t.div_euclid(DAY) + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn day(t: i64) -> String {
    let (y, m, d) = civil(t);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DDThh:mm:ss[.mmm]-0H:00` with a US-Central-like daylight offset,
/// as Synthea writes local times.
struct Ts(i64, Option<i64>);

impl J for Ts {
    fn json(&self, o: &mut String) {
        // Daylight saving time, roughly: April to October.
        let off = 5 - i64::from((4..=10).contains(&civil(self.0).1));
        let local = self.0 - off * 3600;
        let (date, s) = (day(local), local.rem_euclid(DAY));
        let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
        w!(o, "\"{date}T{h:02}:{m:02}:{s:02}");
        if let Some(ms) = self.1 {
            w!(o, ".{ms:03}");
        }
        w!(o, "-0{off}:00\"");
    }
}

const SNOMED: &str = "http://snomed.info/sct";
const LOINC: &str = "http://loinc.org";
const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const SYNTHEA: &str = "https://github.com/synthetichealth/synthea";

/// A code system under `http://terminology.hl7.org/CodeSystem/`.
fn hl7(system: &str) -> String {
    format!("http://terminology.hl7.org/CodeSystem/{system}")
}

fn us_core(name: &str) -> String {
    format!("http://hl7.org/fhir/us/core/StructureDefinition/{name}")
}

fn coding(system: &str, code: &str, display: &str) -> Raw {
    obj! {"system": system, "code": code, "display": display}
}

fn concept(system: &str, code: &str, display: &str) -> Raw {
    obj! {"coding": arr![coding(system, code, display)], "text": display}
}

/// A bare status concept, as clinicalStatus and verificationStatus are written.
fn status(system: &str, code: &str) -> Raw {
    obj! {"coding": arr![obj! {"system": hl7(system), "code": code}]}
}

fn meta(profile: &str) -> Raw {
    obj! {"profile": arr![profile]}
}

fn reference(kind: &str, id: &str) -> Raw {
    obj! {"reference": format!("{kind}/{id}")}
}

fn period(start: i64, end: i64) -> Raw {
    obj! {"start": Ts(start, None), "end": Ts(end, None)}
}

type Code = (&'static str, &'static str);
/// LOINC code, display, UCUM unit, low and high (in units of 10^-decimals), decimals.
type Measure = (&'static str, &'static str, &'static str, i64, i64, u32);
type Panel = (&'static str, &'static str, &'static [Measure]);

// Counts per patient and code tables (real codes and displays, as they appear
// in Synthea exports), kept compact on purpose.
#[rustfmt::skip]
mod tables {
    use super::{Code, Measure, Panel, RXNORM, SNOMED};

    pub const ENC_PER: u64 = 50; pub const OBS_PER: u64 = 150; pub const COND_PER: u64 = 20;
    pub const MED_PER: u64 = 25; pub const PROC_PER: u64 = 30; pub const IMM_PER: u64 = 15;
    pub const REPORT_PER: u64 = 20; pub const ALLERGY_PER: u64 = 1; pub const DOC_PER: u64 = 20;
    /// Resources per patient in `RESOURCE_TYPES` order, close to a Synthea person's full history.
    pub const PER_PATIENT: [u64; 10] =
        [1, ENC_PER, OBS_PER, COND_PER, MED_PER, PROC_PER, IMM_PER, REPORT_PER, ALLERGY_PER, DOC_PER];
    /// Each report owns this many consecutive Observation slots of its patient,
    /// so that report results and lab Observations agree on code and encounter.
    pub const STRIDE: u64 = 7;
    const _: () = assert!(REPORT_PER * STRIDE <= OBS_PER);

    pub const CONDITIONS: &[Code] = &[
        ("160903007", "Full-time employment (finding)"), ("73595000", "Stress (finding)"),
        ("160904001", "Part-time employment (finding)"), ("741062008", "Not in labor force (finding)"),
        ("706893006", "Victim of intimate partner abuse (finding)"), ("423315002", "Limited social contact (finding)"),
        ("422650009", "Social isolation (finding)"), ("195662009", "Acute viral pharyngitis (disorder)"),
        ("444814009", "Viral sinusitis (disorder)"), ("10509002", "Acute bronchitis (disorder)"),
        ("224299000", "Received higher education (finding)"), ("162864005", "Body mass index 30+ - obesity (finding)"),
        ("15777000", "Prediabetes"), ("271737000", "Anemia (disorder)"), ("55822004", "Hyperlipidemia (disorder)"),
        ("301011002", "Escherichia coli urinary tract infection"), ("59621000", "Essential hypertension (disorder)"),
        ("44054006", "Diabetes mellitus type 2 (disorder)"), ("195967001", "Asthma (disorder)"),
        ("43878008", "Streptococcal sore throat (disorder)"), ("57676002", "Joint pain (finding)"),
    ];
    pub const MEDICATIONS: &[Code] = &[
        ("205923", "1 ML Epoetin Alfa 4000 UNT/ML Injection [Epogen]"), ("314076", "lisinopril 10 MG Oral Tablet"),
        ("583214", "PACLitaxel 100 MG Injection"), ("1736854", "Cisplatin 50 MG Injection"),
        ("860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet"),
        ("106892", "insulin isophane, human 70 UNT/ML / insulin, regular, human 30 UNT/ML Injectable Suspension [Humulin]"),
        ("314231", "Simvastatin 10 MG Oral Tablet"), ("310798", "Hydrochlorothiazide 25 MG Oral Tablet"),
        ("351109", "budesonide 0.25 MG/ML Inhalation Suspension"), ("351137", "albuterol 0.21 MG/ML Inhalation Solution"),
        ("904419", "Alendronic acid 10 MG Oral Tablet"), ("206905", "Ibuprofen 400 MG Oral Tablet [Ibu]"),
        ("313782", "Acetaminophen 325 MG Oral Tablet"), ("311989", "Nitrofurantoin 5 MG/ML Oral Suspension"),
        ("562251", "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet"), ("243670", "Aspirin 81 MG Oral Tablet"),
    ];
    pub const PROCEDURES: &[Code] = &[
        ("265764009", "Renal dialysis (procedure)"), ("703423002", "Combined chemotherapy and radiation therapy (procedure)"),
        ("398171003", "Hearing examination (procedure)"), ("710824005", "Assessment of health and social care needs (procedure)"),
        ("171207006", "Depression screening (procedure)"), ("428211000124100", "Assessment of substance use (procedure)"),
        ("454711000124102", "Depression screening using Patient Health Questionnaire Two-Item score (procedure)"),
        ("430193006", "Medication Reconciliation (procedure)"), ("710841007", "Assessment of anxiety (procedure)"),
        ("763302001", "Assessment using Alcohol Use Disorders Identification Test - Consumption (procedure)"),
        ("713106006", "Screening for drug abuse (procedure)"), ("866148006", "Screening for domestic abuse (procedure)"),
        ("385763009", "Hospice care (regime/therapy)"), ("5880005", "Physical examination procedure (procedure)"),
        ("711446003", "Transplantation of kidney regime (regime/therapy)"), ("386516004", "Anticipatory guidance (procedure)"),
    ];
    pub const FLU: Code = ("140", "Influenza, seasonal, injectable, preservative free");
    pub const VACCINES: &[Code] = &[
        FLU, FLU, FLU, FLU, ("208", "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose"),
        ("62", "HPV, quadrivalent"), ("113", "Td (adult), 5 Lf tetanus toxoid, preservative free, adsorbed"), ("115", "Tdap"),
        ("114", "meningococcal MCV4P"), ("52", "Hep A, adult"), ("43", "Hep B, adult"), ("10", "IPV"), ("03", "MMR"),
        ("121", "zoster vaccine, live"), ("21", "varicella"), ("20", "DTaP"), ("33", "pneumococcal polysaccharide vaccine, 23 valent"),
    ];
    /// (system, code, display, category)
    pub const ALLERGENS: &[(&str, &str, &str, &str)] = &[
        (RXNORM, "1191", "Aspirin", "medication"), (RXNORM, "7980", "Penicillin G", "medication"),
        (SNOMED, "442571000124108", "Tree nut (substance)", "food"), (SNOMED, "762952008", "Peanut (substance)", "food"),
        (SNOMED, "735029006", "Shellfish (substance)", "food"), (SNOMED, "102263004", "Eggs (edible) (substance)", "food"),
        (SNOMED, "111088007", "Latex (substance)", "environment"), (SNOMED, "256259004", "Pollen (substance)", "environment"),
        (SNOMED, "264287008", "Animal dander (substance)", "environment"),
        (SNOMED, "260147004", "House dust mite (organism)", "environment"),
    ];
    pub const REACTIONS: &[Code] = &[
        ("247472004", "Wheal (finding)"), ("267036007", "Dyspnea (finding)"), ("271807003", "Eruption of skin (disorder)"),
        ("300359004", "Finding of vomiting (finding)"), ("39579001", "Anaphylaxis (disorder)"),
        ("402387002", "Allergic angioedema (disorder)"), ("418290006", "Itching (finding)"), ("49727002", "Cough (finding)"),
    ];
    /// (class, SNOMED code, display, weight)
    pub const ENCOUNTER_TYPES: &[(&str, &str, &str, u64)] = &[
        ("AMB", "185347001", "Encounter for problem (procedure)", 40), ("AMB", "162673000", "General examination of patient (procedure)", 15),
        ("AMB", "185349003", "Encounter for check up (procedure)", 10), ("AMB", "702927004", "Urgent care clinic (environment)", 6),
        ("AMB", "410620009", "Well child visit (procedure)", 4), ("AMB", "390906007", "Follow-up encounter", 4),
        ("IMP", "185347001", "Encounter for problem", 4), ("AMB", "185345009", "Encounter for symptom", 3),
        ("AMB", "698314001", "Consultation for treatment", 2), ("EMER", "50849002", "Emergency room admission (procedure)", 2),
        ("HH", "439708006", "Home visit (procedure)", 1),
        ("AMB", "33879002", "Administration of vaccine to produce active immunity (procedure)", 1),
    ];
    pub const ORGANIZATIONS: &[&str] = &[
        "NEWMAN MEMORIAL COUNTY HOSPITAL", "UK ST FRANCIS URGENT CARE", "LYON CO HLTH DEPT AND COMMUNITY CENTER",
        "NEWMAN REGIONAL HEALTH", "ASCENSION VIA CHRISTI REHABILITATION HOSPITAL, INC", "OVERLAND PARK REG MED CTR",
        "FAMILY HEALTH MEDICAL GROUP OF OVERLAND PARK, LLC", "GRACEMED HEALTH CLINIC INC",
        "WILLIAMS MEDICAL GROUP PRACTICE LLC", "SUNFLOWER HOME HEALTH AND HOSPICE",
    ];
    /// (city, postal code, latitude, longitude)
    pub const CITIES: &[(&str, &str, f64, f64)] = &[
        ("Emporia", "66801", 38.40, -96.18), ("Olathe", "66061", 38.88, -94.82), ("Wichita", "67202", 37.69, -97.34),
        ("Topeka", "66603", 39.05, -95.68), ("Lawrence", "66044", 38.97, -95.24), ("Overland Park", "66212", 38.98, -94.67),
        ("Haysville", "67060", 37.56, -97.35), ("Manhattan", "66502", 39.18, -96.57), ("Salina", "67401", 38.84, -97.61),
        ("Hutchinson", "67501", 38.06, -97.93), ("Kansas City", "66101", 39.11, -94.63), ("Garden City", "67846", 37.97, -100.87),
    ];
    /// (OMB code, display, weight)
    pub const RACES: &[(&str, &str, u64)] = &[
        ("2106-3", "White", 75), ("2054-5", "Black or African American", 10), ("2028-9", "Asian", 6),
        ("1002-5", "American Indian or Alaska Native", 2), ("2131-1", "Other Race", 7),
    ];
    /// (code, display, as the note says it)
    pub const MARITAL: &[(&str, &str, &str)] = &[
        ("M", "Married", "married"), ("S", "Never Married", "single"), ("D", "Divorced", "divorced"), ("W", "Widowed", "widowed"),
    ];
    pub const FEMALE: &[&str] = &[
        "Sumiko", "Marine", "Elisa", "Corrin", "Yvone", "Gladys", "Karena", "Kasandra", "Larue", "Janina", "Donetta",
        "Suanne", "Liane", "Olevia", "Chelsey", "Millie", "Bobbye", "Wendolyn", "Ai", "María",
    ];
    pub const MALE: &[&str] = &[
        "Devin", "Rocky", "Augustus", "Denis", "Dennis", "Barrett", "Joaquín", "Anibal", "Neville", "Lincoln", "Harold",
        "Jerome", "Carmelo", "Irving", "Tad", "Wilfredo",
    ];
    pub const FAMILY: &[&str] = &[
        "Medhurst", "VonRueden", "Cummerata", "Upton", "Johnson", "Jast", "Cummings", "Schumm", "O'Keefe", "Streich",
        "Champlin", "Cole", "Shanahan", "Emmerich", "Schmitt", "Simonis", "Hermiston", "Eichmann", "Effertz", "Kunze",
        "Wolf", "Wuckert", "Duarte", "Kulas", "Abernathy", "Hahn",
    ];
    pub const STREETS: &[&str] = &["Landing", "Dam", "Street", "Avenue", "Road", "Way", "Gardens", "Run", "Mill", "Parade"];
    pub const COMPLAINTS: &[&str] = &[
        "No complaints.", "Cough", "Fever", "Sore throat", "Headache", "Fatigue", "Joint pain", "Shortness of breath",
    ];
    pub const INSURERS: &[&str] = &["Medicare", "Medicaid", "NO INSURANCE", "Blue Cross Blue Shield", "UnitedHealthcare", "Aetna"];

    pub const VITALS: &[Measure] = &[
        ("8302-2", "Body Height", "cm", 1500, 1900, 1), ("29463-7", "Body Weight", "kg", 500, 1100, 1),
        ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 180, 350, 1), ("8867-4", "Heart rate", "/min", 55, 100, 0),
        ("9279-1", "Respiratory rate", "/min", 12, 20, 0), ("8310-5", "Body temperature", "Cel", 362, 376, 1),
        ("72514-3", "Pain severity - 0-10 verbal numeric rating [Score] - Reported", "{score}", 0, 10, 0),
        ("8480-6", "Systolic Blood Pressure", "mm[Hg]", 100, 140, 0), ("8462-4", "Diastolic Blood Pressure", "mm[Hg]", 60, 90, 0),
    ];
    const BMP: &[Measure] = &[
        ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 650, 1400, 1),
        ("6299-2", "Urea nitrogen [Mass/volume] in Blood", "mg/dL", 70, 200, 1),
        ("38483-4", "Creatinine [Mass/volume] in Blood", "mg/dL", 60, 130, 2),
        ("49765-1", "Calcium [Mass/volume] in Blood", "mg/dL", 85, 105, 1),
        ("2947-0", "Sodium [Moles/volume] in Blood", "mmol/L", 1350, 1450, 1),
        ("6298-4", "Potassium [Moles/volume] in Blood", "mmol/L", 35, 51, 1),
        ("2069-3", "Chloride [Moles/volume] in Blood", "mmol/L", 980, 1070, 1),
    ];
    const LIPIDS: &[Measure] = &[
        ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 1500, 2600, 1),
        ("2571-8", "Triglycerides", "mg/dL", 500, 2000, 1),
        ("18262-6", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay", "mg/dL", 700, 1800, 1),
        ("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", 350, 800, 1),
    ];
    const CBC: &[Measure] = &[
        ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 40, 110, 1),
        ("789-8", "Erythrocytes [#/volume] in Blood by Automated count", "10*6/uL", 420, 590, 2),
        ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 120, 170, 1),
        ("4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count", "%", 360, 500, 1),
        ("787-2", "MCV [Entitic volume] by Automated count", "fL", 800, 1000, 1),
        ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 1500, 4000, 1),
    ];
    const A1C: &[Measure] = &[("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 45, 80, 1)];
    pub const PANELS: &[Panel] = &[
        ("51990-0", "Basic metabolic panel - Blood", BMP), ("57698-3", "Lipid panel with direct LDL - Serum or Plasma", LIPIDS),
        ("58410-2", "CBC panel - Blood by Automated count", CBC), ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", A1C),
    ];
}
use tables::*;

/// When a patient lived, and the organization they usually visit.
struct Life {
    birth: i64,
    end: i64,
    dead: bool,
    org: usize,
}

/// Facts about a patient that other resources repeat.
struct Person {
    id: String,
    female: bool,
    given: [String; 2],
    family: String,
    maiden: String,
    prefix: &'static str,
    marital: usize,
    race: usize,
    hispanic: bool,
    life: Life,
}

/// Facts about an encounter that the resources recorded during it repeat.
struct Visit {
    start: i64,
    end: i64,
    class: &'static str,
    kind: Code,
    org: usize,
}

/// A Synthea-style name: a table entry plus digits.
fn name(r: &mut Rng, table: &[&str]) -> String {
    format!("{}{}", r.pick(table), r.range(1, 999))
}

fn weighted<T>(r: &mut Rng, xs: &[T], weight: fn(&T) -> u64) -> usize {
    let (pick, mut upto) = (r.below(xs.iter().map(weight).sum()), 0);
    let hit = xs.iter().position(|x| {
        upto += weight(x);
        pick < upto
    });
    hit.unwrap_or(xs.len() - 1)
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n =
            (chunk.iter().enumerate()).fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            let c = if i <= chunk.len() {
                A[(n >> (18 - 6 * i) & 63) as usize]
            } else {
                b'='
            };
            out.push(char::from(c));
        }
    }
    out
}

/// A seeded generator of FHIR R4 resources shaped like Synthea's bulk export.
///
/// It holds the seed and, per resource type, the next index
/// [`Generator::ndjson`] will use; it is cheap to create.
pub struct Generator {
    seed: u64,
    cursors: BTreeMap<String, u64>,
}

impl Generator {
    /// A generator whose every output is a function of `seed` and of the calls made on it.
    pub fn new(seed: u64) -> Self {
        Generator {
            seed,
            cursors: BTreeMap::new(),
        }
    }

    /// One resource as a compact JSON line without a trailing newline.
    ///
    /// A pure function of (seed, `resource_type`, `index`): it does not move
    /// the [`Generator::ndjson`] cursors, and the same arguments always give
    /// the same bytes. Types outside [`RESOURCE_TYPES`] get a minimal valid
    /// resource (`resourceType`, `id`, `meta`); this never panics.
    pub fn resource(&mut self, resource_type: &str, index: u64) -> String {
        match resource_type {
            "Patient" => self.patient(index),
            "Encounter" => self.encounter(index),
            "Observation" => self.observation(index),
            "Condition" => self.condition(index),
            "MedicationRequest" => self.medication_request(index),
            "Procedure" => self.procedure(index),
            "Immunization" => self.immunization(index),
            "DiagnosticReport" => self.report(index),
            "AllergyIntolerance" => self.allergy(index),
            "DocumentReference" => self.document(index),
            other => {
                let id = self.id(other, index);
                obj! {"resourceType": other, "id": id, "meta": obj! {"lastUpdated": Ts(NOW, Some(0))}}.0
            }
        }
    }

    /// `count` resources of `resource_type`, each line terminated by `'\n'`.
    ///
    /// Indices continue where the previous call for the same type stopped
    /// (starting at 0), so chunked calls never repeat a resource, and line `k`
    /// of a fresh generator's first call equals `resource(resource_type, k)`.
    pub fn ndjson(&mut self, resource_type: &str, count: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..count {
            let i = self.next_index(resource_type);
            out.extend_from_slice(self.resource(resource_type, i).as_bytes());
            out.push(b'\n');
        }
        out
    }

    /// A mixed-type NDJSON buffer of at least `target_bytes` bytes made of
    /// whole lines, each ending in `'\n'` (empty only when `target_bytes` is 0).
    ///
    /// Types are interleaved in [`export_plan`] proportions by smooth weighted
    /// round robin, so even small buffers mix types; it advances the same
    /// cursors as [`Generator::ndjson`].
    pub fn ndjson_of_size(&mut self, target_bytes: usize) -> Vec<u8> {
        let total: u64 = PER_PATIENT.iter().sum();
        let mut credit = [0i64; PER_PATIENT.len()];
        let mut out = Vec::with_capacity(target_bytes + 8192);
        while out.len() < target_bytes {
            credit
                .iter_mut()
                .zip(PER_PATIENT)
                .for_each(|(c, w)| *c += w as i64);
            let best = (0..credit.len()).fold(0, |b, k| if credit[k] > credit[b] { k } else { b });
            credit[best] -= total as i64;
            let i = self.next_index(RESOURCE_TYPES[best]);
            out.extend_from_slice(self.resource(RESOURCE_TYPES[best], i).as_bytes());
            out.push(b'\n');
        }
        out
    }

    fn next_index(&mut self, resource_type: &str) -> u64 {
        let cursor = self.cursors.entry(resource_type.to_owned()).or_insert(0);
        *cursor += 1;
        *cursor - 1
    }
}

// Facts shared between resources: each comes from its own stream, keyed by the
// type and index of the resource that owns it, so every referrer derives the same value.
impl Generator {
    /// The random stream of `index` for `tag`. Ids, facts and bodies use
    /// distinct tags, so that changing a resource body never shifts the facts
    /// (ids, times, codes) that other resources repeat.
    fn stream(&self, tag: &str, index: u64) -> Rng {
        Rng(fmix(fmix(fmix(self.seed) ^ fnv1a(tag)) ^ index))
    }

    fn id(&self, resource_type: &str, index: u64) -> String {
        self.stream(resource_type, index).uuid()
    }

    fn life(&self, p: u64) -> Life {
        let mut r = self.stream("Patient life", p);
        let birth = r.range(-1_262_304_000, 1_451_520_000); // 1930 to 2015
        let dead = r.chance(15);
        let end = if dead {
            (birth + r.range(YEAR, 90 * YEAR)).min(NOW - DAY)
        } else {
            NOW
        };
        Life {
            birth,
            end,
            dead,
            org: r.below(ORGANIZATIONS.len() as u64) as usize,
        }
    }

    fn person(&self, p: u64) -> Person {
        let (life, mut r) = (self.life(p), self.stream("Patient facts", p));
        let female = r.chance(50);
        let first = if female { FEMALE } else { MALE };
        let given = [name(&mut r, first), name(&mut r, first)];
        let (family, maiden) = (name(&mut r, FAMILY), name(&mut r, FAMILY));
        let adult = life.end - life.birth >= 18 * YEAR;
        let marital = if adult {
            r.below(MARITAL.len() as u64) as usize
        } else {
            1
        };
        let prefix = match (adult, female, marital) {
            (false, ..) => "",
            (true, false, _) => "Mr.",
            (true, true, 0) => "Mrs.",
            _ => "Ms.",
        };
        let race = weighted(&mut r, RACES, |x| x.2);
        let (hispanic, id) = (r.chance(12), self.id("Patient", p));
        Person {
            id,
            female,
            given,
            family,
            maiden,
            prefix,
            marital,
            race,
            hispanic,
            life,
        }
    }

    fn visit(&self, e: u64) -> Visit {
        let (life, mut r) = (self.life(e / ENC_PER), self.stream("Encounter facts", e));
        // A patient's encounters are spread over their life in index order.
        let slot = (e % ENC_PER) as i64 * 1000 + r.below(1000) as i64;
        let start = life.birth + (life.end - life.birth) * slot / (ENC_PER as i64 * 1000);
        let (class, code, display, _) = ENCOUNTER_TYPES[weighted(&mut r, ENCOUNTER_TYPES, |x| x.3)];
        let minutes = match class {
            "AMB" => r.range(15, 60),
            "EMER" => r.range(60, 240),
            "IMP" => r.range(1440, 7200),
            _ => r.range(60, 120),
        };
        let org = if r.chance(70) {
            life.org
        } else {
            r.below(ORGANIZATIONS.len() as u64) as usize
        };
        Visit {
            start,
            end: start + minutes * 60,
            class,
            kind: (code, display),
            org,
        }
    }

    /// One of patient `p`'s encounters, drawn from `r`: its id and facts.
    fn some_visit(&self, r: &mut Rng, p: u64) -> (String, Visit) {
        let e = p * ENC_PER + r.below(ENC_PER);
        (self.id("Encounter", e), self.visit(e))
    }

    fn condition_code(&self, c: u64) -> Code {
        *self.stream("Condition facts", c).pick(CONDITIONS)
    }

    fn medication_code(&self, m: u64) -> Code {
        *self.stream("MedicationRequest facts", m).pick(MEDICATIONS)
    }

    fn allergen(&self, a: u64) -> (&'static str, &'static str, &'static str, &'static str) {
        *self.stream("AllergyIntolerance facts", a).pick(ALLERGENS)
    }

    /// The panel report `d` shows and the index of its encounter.
    fn panel(&self, d: u64) -> (&'static Panel, u64) {
        let mut r = self.stream("DiagnosticReport facts", d);
        let panel = r.pick(PANELS);
        (panel, d / REPORT_PER * ENC_PER + r.below(ENC_PER))
    }

    fn doctor_ref(&self, org: usize) -> Raw {
        let mut r = self.stream("Practitioner facts", org as u64);
        let first = if r.chance(50) { FEMALE } else { MALE };
        let display = format!("Dr. {} {}", name(&mut r, first), name(&mut r, FAMILY));
        let npi = 9_999_900_000 + r.below(100_000);
        let reference = format!("Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|{npi}");
        obj! {"reference": reference, "display": display}
    }

    /// A conditional reference to the Location or Organization of `org`.
    fn site_ref(&self, kind: &str, org: usize) -> Raw {
        let reference = format!("{kind}?identifier={SYNTHEA}|{}", self.id(kind, org as u64));
        obj! {"reference": reference, "display": ORGANIZATIONS[org]}
    }

    fn condition_reason(&self, r: &mut Rng, p: u64) -> Raw {
        let c = p * COND_PER + r.below(COND_PER);
        obj! {"reference": format!("Condition/{}", self.id("Condition", c)), "display": self.condition_code(c).1}
    }
}

// Resource bodies, keys in Synthea's order.
impl Generator {
    fn patient(&self, p: u64) -> String {
        let (who, mut r) = (self.person(p), self.stream("Patient body", p));
        let (race_code, race, _) = RACES[who.race];
        let (eth_code, eth) = match who.hispanic {
            true => ("2135-2", "Hispanic or Latino"),
            false => ("2186-5", "Not Hispanic or Latino"),
        };
        let omb = |url: &str, code: &str, display: &str| {
            let category = coding("urn:oid:2.16.840.1.113883.6.238", code, display);
            let parts = arr![
                obj! {"url": "ombCategory", "valueCoding": category},
                obj! {"url": "text", "valueString": display}
            ];
            obj! {"url": us_core(url), "extension": parts}
        };
        let ident = |code: &str, text: &str, system: &str, value: String| {
            obj! {"type": concept(&hl7("v2-0203"), code, text), "system": system, "value": value}
        };
        let adult = !who.prefix.is_empty();
        let years = (who.life.end - who.life.birth) as f64 / YEAR as f64;
        let given = arr![who.given[0], who.given[1]];
        let prefix = adult.then(|| arr![who.prefix]);
        let (daly, (city, zip, lat, lon)) = (r.unit() * years / 10.0, *r.pick(CITIES));
        let (lang, language) = match who.hispanic && r.chance(50) {
            true => ("es", "Spanish"),
            false => ("en-US", "English (United States)"),
        };
        let div = format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">Generated by sqlite-export-store's synthetic module, shaped like <a href=\"https://github.com/synthetichealth/synthea\">Synthea</a>.\n .   Person seed: {}  Population seed: {}</div>", r.next() as i64, self.seed);
        obj! {
            "resourceType": "Patient", "id": who.id.as_str(), "meta": meta(&us_core("us-core-patient")),
            "text": obj! {"status": "generated", "div": div},
            "extension": arr![omb("us-core-race", race_code, race), omb("us-core-ethnicity", eth_code, eth),
                obj! {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName", "valueString": format!("{} {}", name(&mut r, FEMALE), name(&mut r, FAMILY))},
                obj! {"url": us_core("us-core-birthsex"), "valueCode": if who.female { "F" } else { "M" }},
                obj! {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace", "valueAddress": obj! {"city": r.pick(CITIES).0, "state": "Kansas", "country": "US"}},
                obj! {"url": "http://synthetichealth.github.io/synthea/disability-adjusted-life-years", "valueDecimal": daly},
                obj! {"url": "http://synthetichealth.github.io/synthea/quality-adjusted-life-years", "valueDecimal": years - daly}],
            "identifier": arr![obj! {"system": SYNTHEA, "value": who.id.as_str()},
                ident("MR", "Medical Record Number", "http://hospital.smarthealthit.org", who.id.clone()),
                ident("SS", "Social Security Number", "http://hl7.org/fhir/sid/us-ssn", format!("999-{:02}-{:04}", r.below(100), r.below(10_000))),
                adult.then(|| ident("DL", "Driver's license number", "urn:oid:2.16.840.1.113883.4.3.25", format!("S999{:05}", r.below(100_000)))),
                (adult && r.chance(50)).then(|| ident("PPN", "Passport Number", "http://standardhealthrecord.org/fhir/StructureDefinition/passportNumber", format!("X{:08}X", r.below(100_000_000))))],
            "name": arr![obj! {"use": "official", "family": who.family.as_str(), "given": given.clone(), "prefix": prefix.clone()},
                (who.female && who.marital == 0).then(|| obj! {"use": "maiden", "family": who.maiden.as_str(), "given": given, "prefix": prefix})],
            "telecom": arr![obj! {"system": "phone", "value": format!("555-{:03}-{:04}", r.below(1000), r.below(10_000)), "use": "home"}],
            "gender": if who.female { "female" } else { "male" }, "birthDate": day(who.life.birth),
            "deceasedDateTime": who.life.dead.then_some(Ts(who.life.end, None)),
            "address": arr![obj! {
                "extension": arr![obj! {"url": "http://hl7.org/fhir/StructureDefinition/geolocation", "extension": arr![
                    obj! {"url": "latitude", "valueDecimal": lat + (r.unit() - 0.5) / 10.0},
                    obj! {"url": "longitude", "valueDecimal": lon + (r.unit() - 0.5) / 10.0}]}],
                "line": arr![format!("{} {} {}", r.range(1, 999), r.pick(FAMILY), r.pick(STREETS))],
                "city": city, "state": "KS", "postalCode": zip, "country": "US"}],
            "maritalStatus": concept(&hl7("v3-MaritalStatus"), MARITAL[who.marital].0, MARITAL[who.marital].1),
            "multipleBirthBoolean": false,
            "communication": arr![obj! {"language": concept("urn:ietf:bcp:47", lang, language)}],
        }.0
    }

    fn encounter(&self, e: u64) -> String {
        let (who, v) = (self.person(e / ENC_PER), self.visit(e));
        let mut r = self.stream("Encounter body", e);
        let id = self.id("Encounter", e);
        let routine = "Discharged to home care or self care (routine discharge)";
        obj! {
            "resourceType": "Encounter", "id": id.as_str(), "meta": meta(&us_core("us-core-encounter")),
            "identifier": arr![obj! {"use": "official", "system": SYNTHEA, "value": id.as_str()}], "status": "finished",
            "class": obj! {"system": hl7("v3-ActCode"), "code": v.class}, "type": arr![concept(SNOMED, v.kind.0, v.kind.1)],
            "subject": obj! {"reference": format!("Patient/{}", who.id), "display": format!("{} {} {} {}", who.prefix, who.given[0], who.given[1], who.family).trim_start()},
            "participant": arr![obj! {"type": arr![concept(&hl7("v3-ParticipationType"), "PPRF", "primary performer")],
                "period": period(v.start, v.end), "individual": self.doctor_ref(v.org)}],
            "period": period(v.start, v.end),
            "reasonCode": r.chance(55).then(|| r.pick(CONDITIONS)).map(|(code, display)| arr![obj! {"coding": arr![coding(SNOMED, code, display)]}]),
            "hospitalization": matches!(v.class, "EMER" | "IMP").then(|| obj! {"dischargeDisposition": concept("http://www.nubc.org/patient-discharge", "01", routine)}),
            "location": arr![obj! {"location": self.site_ref("Location", v.org)}], "serviceProvider": self.site_ref("Organization", v.org),
        }.0
    }

    fn observation(&self, x: u64) -> String {
        let (p, slot, mut r) = (x / OBS_PER, x % OBS_PER, self.stream("Observation body", x));
        // Slots owned by a report hold that report's panel members; the rest are vital signs.
        let lab = (slot < REPORT_PER * STRIDE).then(|| self.panel(p * REPORT_PER + slot / STRIDE));
        let lab = lab.and_then(|(panel, e)| panel.2.get((slot % STRIDE) as usize).map(|m| (m, e)));
        let (m, e) = lab.unwrap_or_else(|| (r.pick(VITALS), p * ENC_PER + r.below(ENC_PER)));
        let (v, scale) = (self.visit(e), 10i64.pow(m.5));
        let (category, display, profile) = match lab {
            Some(_) => (
                "laboratory",
                "Laboratory",
                us_core("us-core-observation-lab"),
            ),
            None => (
                "vital-signs",
                "Vital signs",
                "http://hl7.org/fhir/StructureDefinition/vitalsigns".into(),
            ),
        };
        // Fixed-point digits: exact, and formatted without going through floats.
        let value = r.range(m.3, m.4);
        let value = match m.5 {
            0 => value.to_string(),
            d => format!("{}.{:0w$}", value / scale, value % scale, w = d as usize),
        };
        obj! {
            "resourceType": "Observation", "id": self.id("Observation", x), "meta": meta(&profile),
            "status": "final", "category": arr![obj! {"coding": arr![coding(&hl7("observation-category"), category, display)]}],
            "code": concept(LOINC, m.0, m.1),
            "subject": reference("Patient", &self.id("Patient", p)), "encounter": reference("Encounter", &self.id("Encounter", e)),
            "effectiveDateTime": Ts(v.start, None), "issued": Ts(v.start + r.range(0, 3600), Some(r.range(0, 999))),
            "valueQuantity": obj! {"value": Raw(value), "unit": m.2, "system": "http://unitsofmeasure.org", "code": m.2},
        }.0
    }

    fn condition(&self, c: u64) -> String {
        let (p, mut r) = (c / COND_PER, self.stream("Condition body", c));
        let ((enc, v), (code, display)) = (self.some_visit(&mut r, p), self.condition_code(c));
        let resolved = r.chance(80);
        let category = coding(
            &hl7("condition-category"),
            "encounter-diagnosis",
            "Encounter Diagnosis",
        );
        obj! {
            "resourceType": "Condition", "id": self.id("Condition", c), "meta": meta(&us_core("us-core-condition-encounter-diagnosis")),
            "clinicalStatus": status("condition-clinical", if resolved { "resolved" } else { "active" }),
            "verificationStatus": status("condition-ver-status", "confirmed"),
            "category": arr![obj! {"coding": arr![category]}], "code": concept(SNOMED, code, display),
            "subject": reference("Patient", &self.id("Patient", p)), "encounter": reference("Encounter", &enc),
            "onsetDateTime": Ts(v.start, None), "abatementDateTime": resolved.then(|| Ts(v.start + r.range(7, 700) * DAY, None)),
            "recordedDate": Ts(v.start, None),
        }.0
    }

    fn medication_request(&self, m: u64) -> String {
        let (p, mut r) = (m / MED_PER, self.stream("MedicationRequest body", m));
        let ((enc, v), (code, display)) = (self.some_visit(&mut r, p), self.medication_code(m));
        obj! {
            "resourceType": "MedicationRequest", "id": self.id("MedicationRequest", m), "meta": meta(&us_core("us-core-medicationrequest")),
            "status": if v.end + YEAR < NOW { "stopped" } else { "active" }, "intent": "order",
            "category": arr![obj! {"coding": arr![coding(&hl7("medicationrequest-category"), "community", "Community")], "text": "Community"}],
            "medicationCodeableConcept": concept(RXNORM, code, display),
            "subject": reference("Patient", &self.id("Patient", p)), "encounter": reference("Encounter", &enc),
            "authoredOn": Ts(v.start, None), "requester": self.doctor_ref(v.org),
            "reasonReference": r.chance(80).then(|| arr![self.condition_reason(&mut r, p)]),
            "dosageInstruction": r.chance(25).then(|| arr![obj! {"sequence": 1u64,
                "timing": obj! {"repeat": obj! {"frequency": r.below(3) + 1, "period": Raw("1.0".into()), "periodUnit": "d"}},
                "asNeededBoolean": false, "doseAndRate": arr![obj! {"type": obj! {"coding": arr![coding(&hl7("dose-rate-type"), "ordered", "Ordered")]},
                "doseQuantity": obj! {"value": Raw("1.0".into())}}]}]),
        }.0
    }

    fn procedure(&self, x: u64) -> String {
        let (p, mut r) = (x / PROC_PER, self.stream("Procedure body", x));
        let ((enc, v), (code, display)) = (self.some_visit(&mut r, p), *r.pick(PROCEDURES));
        let start = v.start + r.range(0, 10) * 60;
        obj! {
            "resourceType": "Procedure", "id": self.id("Procedure", x), "meta": meta(&us_core("us-core-procedure")),
            "status": "completed", "code": concept(SNOMED, code, display),
            "subject": reference("Patient", &self.id("Patient", p)), "encounter": reference("Encounter", &enc),
            "performedPeriod": period(start, start + r.range(5, 60) * 60), "location": self.site_ref("Location", v.org),
            "reasonReference": r.chance(40).then(|| arr![self.condition_reason(&mut r, p)]),
        }.0
    }

    fn immunization(&self, x: u64) -> String {
        let (p, mut r) = (x / IMM_PER, self.stream("Immunization body", x));
        let ((enc, v), (code, display)) = (self.some_visit(&mut r, p), *r.pick(VACCINES));
        obj! {
            "resourceType": "Immunization", "id": self.id("Immunization", x), "meta": meta(&us_core("us-core-immunization")),
            "status": "completed", "vaccineCode": concept("http://hl7.org/fhir/sid/cvx", code, display),
            "patient": reference("Patient", &self.id("Patient", p)), "encounter": reference("Encounter", &enc),
            "occurrenceDateTime": Ts(v.start, None), "primarySource": true, "location": self.site_ref("Location", v.org),
        }.0
    }

    fn report(&self, d: u64) -> String {
        let (p, mut r) = (d / REPORT_PER, self.stream("DiagnosticReport body", d));
        let (&(code, display, members), e) = self.panel(d);
        let (v, first) = (self.visit(e), p * OBS_PER + d % REPORT_PER * STRIDE);
        let results: Vec<Raw> = (members.iter().zip(first..))
            .map(|(m, o)| obj! {"reference": format!("Observation/{}", self.id("Observation", o)), "display": m.1})
            .collect();
        obj! {
            "resourceType": "DiagnosticReport", "id": self.id("DiagnosticReport", d), "meta": meta(&us_core("us-core-diagnosticreport-lab")),
            "status": "final", "category": arr![obj! {"coding": arr![coding(&hl7("v2-0074"), "LAB", "Laboratory")]}],
            "code": concept(LOINC, code, display),
            "subject": reference("Patient", &self.id("Patient", p)), "encounter": reference("Encounter", &self.id("Encounter", e)),
            "effectiveDateTime": Ts(v.start, None), "issued": Ts(v.start + r.range(0, 3600), Some(r.range(0, 999))),
            "performer": arr![self.site_ref("Organization", v.org)], "result": results,
        }.0
    }

    fn allergy(&self, a: u64) -> String {
        let (p, mut r) = (a / ALLERGY_PER, self.stream("AllergyIntolerance body", a));
        let (life, (system, code, display, category)) = (self.life(p), self.allergen(a));
        let reactions: Vec<Raw> = (0..r.below(5))
            .map(|_| r.pick(REACTIONS))
            .map(|&(code, display)| obj! {"manifestation": arr![concept(SNOMED, code, display)]})
            .collect();
        obj! {
            "resourceType": "AllergyIntolerance", "id": self.id("AllergyIntolerance", a), "meta": meta(&us_core("us-core-allergyintolerance")),
            "clinicalStatus": status("allergyintolerance-clinical", "active"),
            "verificationStatus": status("allergyintolerance-verification", "confirmed"),
            "type": "allergy", "category": arr![category], "criticality": if r.chance(80) { "low" } else { "high" },
            "code": concept(system, code, display), "patient": reference("Patient", &self.id("Patient", p)),
            "recordedDate": Ts(life.birth + r.range(0, life.end - life.birth), None),
            "reaction": (!reactions.is_empty()).then_some(reactions),
        }.0
    }

    fn document(&self, x: u64) -> String {
        let (p, mut r) = (x / DOC_PER, self.stream("DocumentReference body", x));
        // Notes follow the patient's encounters in order, as Synthea writes one per encounter.
        let e = p * ENC_PER + x % DOC_PER * ENC_PER / DOC_PER;
        let (who, v) = (self.person(p), self.visit(e));
        let note = base64(self.note(&mut r, p, &who, &v).as_bytes());
        let (kind, kind_display) = match v.class {
            "EMER" => ("34111-5", "Emergency department note"),
            _ => ("34117-2", "History and physical note"),
        };
        let category = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category";
        obj! {
            "resourceType": "DocumentReference", "id": self.id("DocumentReference", x), "meta": meta(&us_core("us-core-documentreference")),
            "identifier": arr![obj! {"system": "urn:ietf:rfc:3986", "value": format!("urn:uuid:{}", r.uuid())}],
            "status": if x % DOC_PER == DOC_PER - 1 { "current" } else { "superseded" },
            "type": obj! {"coding": arr![coding(LOINC, kind, kind_display), coding(LOINC, "51847-2", "Evaluation + Plan note")]},
            "category": arr![obj! {"coding": arr![coding(category, "clinical-note", "Clinical Note")]}],
            "subject": reference("Patient", &who.id), "date": Ts(v.start, Some(r.range(0, 999))),
            "author": arr![self.doctor_ref(v.org)], "custodian": self.site_ref("Organization", v.org),
            "content": arr![obj! {"attachment": obj! {"contentType": "text/plain; charset=utf-8", "data": note},
                "format": obj! {"system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode", "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient", "display": "mimeType Sufficient"}}],
            "context": obj! {"encounter": arr![reference("Encounter", &self.id("Encounter", e))], "period": period(v.start, v.end)},
        }.0
    }

    /// A plain-text clinical note in Synthea's layout. It repeats the patient's
    /// own conditions and medications, which is what makes real notes compress well.
    fn note(&self, r: &mut Rng, p: u64, who: &Person, v: &Visit) -> String {
        let lower = |s: &str| s.to_ascii_lowercase();
        let history: Vec<String> = (0..4 + r.below(12))
            .map(|k| lower(self.condition_code(p * COND_PER + k).1))
            .collect();
        let meds: Vec<String> = (0..1 + r.below(6))
            .map(|k| lower(self.medication_code(p * MED_PER + k).1))
            .collect();
        let smoking = match r.chance(50) {
            true => "Patient has never smoked.".to_owned(),
            false => format!("Patient quit smoking at age {}.", r.range(16, 40)),
        };
        let schooling = [
            "completed some college courses",
            "a high school education",
            "received a higher education",
        ];
        let mut t = format!(
            "\n{}\n\n# Chief Complaint\n- {}\n\n\n# History of Present Illness\n{} {}\n is a {} year-old {} {} {}. Patient has a history of {}.\n\n# Social History\nPatient is {}. {smoking}\n Patient identifies as heterosexual.\n\nPatient comes from a {} socioeconomic background.\n Patient has {}.\nPatient currently has {}.\n\n# Allergies\nAllergy to {}.\n\n# Medications\n{}\n\n# Assessment and Plan\nPatient is presenting with {}.\n\n\n## Plan\n\nThe following procedures were conducted:\n",
            day(v.start), r.pick(COMPLAINTS), who.given[0], who.given[1], (v.start - who.life.birth) / YEAR,
            if who.hispanic { "hispanic" } else { "nonhispanic" }, lower(RACES[who.race].1),
            if who.female { "female" } else { "male" }, history.join(", "), MARITAL[who.marital].2,
            r.pick(&["low", "middle", "high"]), r.pick(&schooling), r.pick(INSURERS),
            lower(self.allergen(p * ALLERGY_PER).2), meds.join("; "), lower(r.pick(CONDITIONS).1),
        );
        for _ in 0..r.below(12) {
            w!(t, "- {}\n", lower(r.pick(PROCEDURES).1));
        }
        t.push_str("The patient was prescribed the following medications:\n");
        for _ in 0..r.below(12) {
            w!(t, "- {}\n", r.pick(&meds));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::HashSet;

    fn lines(buf: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(buf).expect("NDJSON is UTF-8");
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "last line is not terminated"
        );
        let parse = |l: &str| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        text.lines().map(parse).collect()
    }

    /// Every `reference` string anywhere in `v`.
    fn references(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => m.iter().for_each(|(k, v)| match (k.as_str(), v) {
                ("reference", Value::String(s)) => out.push(s.clone()),
                _ => references(v, out),
            }),
            Value::Array(a) => a.iter().for_each(|v| references(v, out)),
            _ => {}
        }
    }

    #[test]
    fn same_seed_same_bytes_and_another_seed_differs() {
        let a = Generator::new(7).ndjson_of_size(300_000);
        assert_eq!(a, Generator::new(7).ndjson_of_size(300_000));
        assert_ne!(a, Generator::new(8).ndjson_of_size(300_000));
        for t in RESOURCE_TYPES {
            assert_eq!(
                Generator::new(1).ndjson(t, 5),
                Generator::new(1).ndjson(t, 5),
                "{t}"
            );
            assert_ne!(
                Generator::new(1).ndjson(t, 5),
                Generator::new(2).ndjson(t, 5),
                "{t}"
            );
        }
    }

    #[test]
    fn every_line_is_one_resource_of_the_requested_type() {
        let mut g = Generator::new(3);
        for t in RESOURCE_TYPES
            .iter()
            .copied()
            .chain(["Basic", "Odd\"Type\\"])
        {
            let buf = g.ndjson(t, 60);
            assert_eq!(
                buf.iter().filter(|b| **b == b'\n').count(),
                60,
                "{t}: one line per resource"
            );
            for v in lines(&buf) {
                assert_eq!(v["resourceType"], t);
                let id = v["id"].as_str().expect("id is a string");
                assert!(
                    id.len() == 36 && id.matches('-').count() == 4,
                    "{t}: id {id}"
                );
            }
            assert!(!g.resource(t, 1_000_000).contains('\n'), "{t}");
        }
        let first = String::from_utf8(Generator::new(3).ndjson("Encounter", 4)).unwrap();
        assert_eq!(
            first.lines().nth(3).unwrap(),
            Generator::new(3).resource("Encounter", 3)
        );
        // 60 Patients were written above, so the next call starts at index 60.
        let next = String::from_utf8(g.ndjson("Patient", 1)).unwrap();
        assert_eq!(next, g.resource("Patient", 60) + "\n");
    }

    #[test]
    fn references_resolve_within_an_export() {
        let mut g = Generator::new(11);
        let export: Vec<Value> = export_plan(3)
            .into_iter()
            .flat_map(|(t, n)| lines(&g.ndjson(t, n)))
            .collect();
        let known: HashSet<String> = export
            .iter()
            .map(|v| {
                format!(
                    "{}/{}",
                    v["resourceType"].as_str().unwrap(),
                    v["id"].as_str().unwrap()
                )
            })
            .collect();
        let mut checked = 0;
        for v in &export {
            let mut refs = Vec::new();
            references(v, &mut refs);
            for r in refs.iter().filter(|r| !r.contains('?')) {
                assert!(
                    known.contains(r.as_str()),
                    "{} points at missing {r}",
                    v["resourceType"]
                );
                checked += 1;
            }
        }
        assert!(checked > 3 * 300, "only {checked} references checked");
    }

    #[test]
    fn ndjson_of_size_reaches_its_target_with_whole_lines() {
        assert!(Generator::new(5).ndjson_of_size(0).is_empty());
        for target in [1, 10_000, 1 << 20] {
            let buf = Generator::new(5).ndjson_of_size(target);
            assert!(
                buf.len() >= target && buf.ends_with(b"\n"),
                "target {target}: {} bytes",
                buf.len()
            );
            let types: HashSet<String> = lines(&buf)
                .iter()
                .map(|v| v["resourceType"].to_string())
                .collect();
            assert!(
                target < 1 << 20 || types.len() == RESOURCE_TYPES.len(),
                "{types:?}"
            );
        }
    }

    #[test]
    fn export_plan_has_realistic_proportions() {
        let plan = export_plan(10);
        let count = |t: &str| plan.iter().find(|(name, _)| *name == t).unwrap().1;
        assert_eq!(
            plan.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            RESOURCE_TYPES
        );
        assert_eq!(count("Patient"), 10);
        assert!(count("Observation") > count("Encounter") && count("Encounter") > count("Patient"));
        assert!(plan.iter().all(|(_, n)| *n > 0));
        assert!(export_plan(0).iter().all(|(_, n)| *n == 0));
        assert!(export_plan(u64::MAX).iter().all(|(_, n)| *n == u64::MAX));
    }

    #[test]
    fn timestamps_and_base64_are_right() {
        let ts = |t, ms| obj! {"t": Ts(t, ms)}.0;
        assert_eq!(ts(0, None), r#"{"t":"1969-12-31T19:00:00-05:00"}"#);
        assert_eq!(ts(NOW, Some(7)), r#"{"t":"2024-07-31T20:00:00.007-04:00"}"#);
        assert_eq!(
            ts(-1_262_304_000, None),
            r#"{"t":"1929-12-31T19:00:00-05:00"}"#
        );
        assert_eq!(day(951_782_400), "2000-02-29");
        assert_eq!(
            [base64(b"Man"), base64(b"Ma"), base64(b"M")],
            ["TWFu", "TWE=", "TQ=="]
        );
    }

    #[test]
    fn line_lengths_are_close_to_the_synthea_sample() {
        let average = |text: &str| {
            text.lines().map(str::len).sum::<usize>() as f64 / text.lines().count() as f64
        };
        let mut g = Generator::new(2024);
        for t in [
            "Patient",
            "Encounter",
            "Condition",
            "MedicationRequest",
            "Procedure",
            "Immunization",
            "DocumentReference",
        ] {
            let real = crate::testkit::sample::synthea_file(&format!("{t}.000.ndjson"))
                .map(|bytes| String::from_utf8(bytes).unwrap())
                .unwrap_or_else(|e| panic!("{e}"));
            let ours = average(std::str::from_utf8(&g.ndjson(t, 200)).unwrap());
            let ratio = ours / average(&real);
            assert!(
                (0.5..2.0).contains(&ratio),
                "{t}: {ours:.0} bytes per line vs {:.0} in Synthea",
                average(&real)
            );
        }
    }
}
